//! A fleet of worker processes on one queue, and the ways a worker can fail it: renders run in
//! parallel on every worker, a SIGKILLed worker's job completes once elsewhere, a frozen
//! render is given up by the watchdog, and a job that kills its worker on every attempt still
//! ends as one dead letter and one `failed` event with nobody connected in between.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// `(worker, attempt)` of each `started` event of `job`, in order.
async fn starts(stack: &Stack, job: JobId) -> Vec<(String, u32)> {
    stack
        .started(job)
        .await
        .into_iter()
        .map(|s| (s.worker, s.attempt))
        .collect()
}

/// Steps done of `job`'s latest `progress` (0 before the first).
async fn steps_done(stack: &Stack, job: JobId) -> u32 {
    stack
        .events(job, "progress")
        .await
        .iter()
        .filter_map(|p| CloudEvent::<JobProgress>::from_json(p).ok())
        .map(|p| p.data.step)
        .max()
        .unwrap_or(0)
}

/// Three CPU workers share this machine's two cores with the other tests: the whole fleet's
/// renders get this long.
const FLEET_WAIT: Duration = Duration::from_secs(600);

/// Waits for `worker` to exit by itself; its exit status.
async fn exited(worker: &mut Worker) -> std::process::ExitStatus {
    match tokio::time::timeout(WAIT, worker.child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!("the worker did not exit:\n{}", worker.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_render_at_once_and_a_killed_workers_job_completes_once_elsewhere() {
    let stack = Stack::start().await;
    let names = ["gpu-a", "gpu-b", "gpu-c"];
    let mut workers = Vec::new();
    for name in names {
        workers.push(stack.worker(name).await);
    }
    let mut jobs = Vec::new();
    for seed in 0..6u8 {
        let object = stack
            .upload("tiny-fleet", &format!("fleet-{seed}.jpg"), 20 + seed)
            .await;
        jobs.push(object.job_id().unwrap());
        stack.announce(&object).await;
    }

    // Three renders under way at the same moment, one on each worker.
    let running = darkroom_tests::wait_for(
        FLEET_WAIT,
        || async {
            let mut running = BTreeMap::new();
            for &job in &jobs {
                if stack.events(job, "completed").await.is_empty()
                    && let Some((worker, _)) = starts(&stack, job).await.pop()
                {
                    running.insert(worker, job);
                }
            }
            running
        },
        |running| running.len() == names.len(),
    )
    .await;

    // One of them dies mid-job: the one least far along, so it cannot finish first.
    let mut least = None;
    for (worker, job) in &running {
        let done = steps_done(&stack, *job).await;
        if least.as_ref().is_none_or(|(_, _, d)| done < *d) {
            least = Some((worker.clone(), *job, done));
        }
    }
    let (victim, victim_job, _) = least.unwrap();
    let index = names.iter().position(|n| *n == victim).unwrap();
    workers[index].child.start_kill().unwrap();
    workers[index].child.wait().await.unwrap();

    for &job in &jobs {
        darkroom_tests::wait_for(
            FLEET_WAIT,
            || stack.events(job, "completed"),
            |e| !e.is_empty(),
        )
        .await;
    }
    // Past a redelivery or two: still one completion per upload.
    tokio::time::sleep(Duration::from_secs(2 * ACK_WAIT_SECS)).await;
    let mut finishers = BTreeSet::new();
    for &job in &jobs {
        let completions = stack.events(job, "completed").await;
        assert_eq!(completions.len(), 1, "job {job}");
        finishers.insert(stack.completed(job).await.worker);
    }
    let completed = stack.completed(victim_job).await;
    assert_ne!(completed.worker, victim, "the killed worker's job moved on");
    assert_eq!(completed.attempt, 2);
    assert!(finishers.len() >= 2, "completions came from {finishers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_render_is_given_up_by_the_watchdog_and_completes_once_on_another_worker() {
    let stack = Stack::start().await;
    // The engine thread stops for good after step 2, as a CUDA call that never returns would.
    let mut frozen = stack.spawn_worker(
        "gpu-frozen",
        true,
        &[
            ("DARKROOM_TEST_FAULT", "freeze@2"),
            ("DARKROOM_WATCHDOG_SECS", "3"),
        ],
    );
    frozen.wait_until_consuming().await;
    let object = stack.upload("tiny-slow", "frozen.jpg", 5).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;

    // It stops renewing the job, hands it back and exits non-zero for its supervisor.
    let status = exited(&mut frozen).await;
    assert!(!status.success(), "{status}");
    let log = frozen.log();
    assert!(log.contains("watchdog"), "{log}");
    assert!(stack.events(job, "completed").await.is_empty());

    let _healthy = stack.worker("gpu-healthy").await;
    let completed = stack.completed(job).await;
    assert_eq!(completed.worker, "gpu-healthy");
    assert_eq!(starts(&stack, job).await.len(), 2);
    tokio::time::sleep(Duration::from_secs(2 * ACK_WAIT_SECS)).await;
    assert_eq!(stack.events(job, "completed").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_every_worker_is_dead_lettered_once_and_replay_brings_it_back() {
    let stack = Stack::start().await;
    let object = stack.upload("tiny-desk", "crasher.jpg", 6).await;
    let job = object.job_id().unwrap();
    stack.announce(&object).await;

    // Every attempt kills its worker; nobody else is connected in between.
    let attempts = stack.topology.max_deliver;
    for attempt in 1..=attempts {
        let mut worker = stack.spawn_worker(
            &format!("gpu-crash-{attempt}"),
            true,
            &[("DARKROOM_TEST_FAULT", "abort@1")],
        );
        let status = exited(&mut worker).await;
        assert!(!status.success(), "{status}");
    }
    assert_eq!(starts(&stack, job).await.len(), attempts as usize);
    // The last attempt's AckWait runs out with no consumer connected.
    tokio::time::sleep(Duration::from_secs(3 * ACK_WAIT_SECS)).await;
    assert!(stack.events(job, "failed").await.is_empty());

    // The next worker to connect dead-letters it without rendering it.
    let _healthy = stack.worker("gpu-healthy").await;
    let failed = stack.failed(job).await;
    assert_eq!(failed.reason, FailureReason::MaxDeliveriesExceeded);
    assert_eq!(starts(&stack, job).await.len(), attempts as usize);
    darkroom_tests::wait_for(
        WAIT,
        || stack.status(job),
        |status| *status == Some(JobStatus::Failed),
    )
    .await;
    let letters = darkroom_tests::stream_messages(&stack.js, subjects::DLQ_STREAM).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0]
            .headers
            .get(headers::DLQ_REASON)
            .unwrap()
            .as_str(),
        "max_deliveries_exceeded"
    );
    tokio::time::sleep(Duration::from_secs(2 * ACK_WAIT_SECS)).await;
    assert_eq!(stack.events(job, "failed").await.len(), 1);

    // Replayed, it renders on the healthy worker.
    stack.replay_dlq(job).await;
    let completed = stack.completed(job).await;
    assert_eq!(completed.worker, "gpu-healthy");
    assert_eq!(stack.events(job, "completed").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_the_worker_with_one_line() {
    let output = darkroom_tests::clean_command(env!("CARGO_BIN_EXE_darkroom-inference-worker"))
        .env("DARKROOM_WATCHDOG_SECS", "ten minutes")
        .env("RUST_BACKTRACE", "1")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("darkroom-inference: DARKROOM_WATCHDOG_SECS=ten minutes: expected u64"),
        "{stderr}"
    );
}
