//! Reconciler benchmark: what one sweep of the inbox costs as the bucket grows, the
//! watermark's sweep next to a full re-examination (what every sweep did before), on the same
//! servers in one run.
//!
//! ```sh
//! cargo bench -p darkroom-tests --bench reconciler -- [--objects 100000] [--new 100] [--concurrency 64]
//! ```
//!
//! `nats-server` and SeaweedFS from the test harness; `--objects` small objects PUT under
//! `inbox/`, then four sweeps of ingest's reconciler (`darkroom_ingest::reconcile::sweep`):
//!
//! 1. the first sweep, nothing known: every object examined (a KV read, a receipt HEAD) and
//!    relayed (a publish, a record);
//! 2. a full re-examination with every object known: a KV read per object, as every sweep did
//!    before the watermark;
//! 3. the watermark's sweep with nothing new: the listing only;
//! 4. the watermark's sweep after `--new` more uploads: those examined and relayed.
//!
//! The margin is 0 here (production: 15 min, so each sweep also re-examines the last 15
//! minutes of uploads); S3 dates objects to the second, so the newest second's objects are
//! examined again.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use darkroom_ingest::IngestConfig;
use darkroom_ingest::reconcile::{self, ReconcileReport, Watermark};
use darkroom_shared::RuntimeConfig;
use darkroom_tests::{NatsServer, S3Server};
use futures::StreamExt;

const BUCKET: &str = "photos";

struct Args {
    objects: usize,
    new: usize,
    concurrency: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        objects: 100_000,
        new: 100,
        concurrency: 64,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        if flag == "--bench" {
            continue;
        }
        let mut number = || -> Result<usize> {
            let text = given
                .next()
                .ok_or_else(|| anyhow!("{flag} needs a value"))?;
            text.parse()
                .with_context(|| format!("{flag}: not a number: {text}"))
        };
        match flag.as_str() {
            "--objects" => args.objects = number()?,
            "--new" => args.new = number()?,
            "--concurrency" => args.concurrency = number()?.max(1),
            other => bail!(
                "unknown argument {other}\nusage: reconciler [--objects N] [--new N] [--concurrency N]"
            ),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokio: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn put_many(
    s3: &aws_sdk_s3::Client,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let puts = futures::stream::iter((0..count).map(|index| {
        let key = format!("inbox/bench/{prefix}-{index:07}.jpg");
        async move {
            s3.put_object()
                .bucket(BUCKET)
                .key(&key)
                .body(format!("object {index}").into_bytes().into())
                .send()
                .await
                .with_context(|| format!("PUT {key}"))
        }
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<_>>()
    .await;
    for put in puts {
        put?;
    }
    Ok(started.elapsed())
}

async fn timed_sweep(
    relay: &darkroom_ingest::relay::UploadRelay,
    watermark: &mut Watermark,
) -> Result<(ReconcileReport, Duration)> {
    let started = Instant::now();
    let report = reconcile::sweep(relay, BUCKET, watermark, chrono::TimeDelta::zero())
        .await
        .map_err(|e| anyhow!("sweep: {e}"))?;
    Ok((report, started.elapsed()))
}

async fn run(args: Args) -> Result<()> {
    let nats = NatsServer::start().await?;
    let s3_server = S3Server::start(None).await?;
    let s3 = s3_server.client().await;
    darkroom_shared::s3::ensure_bucket(&s3, BUCKET)
        .await
        .context("create the bucket")?;
    let config = IngestConfig {
        runtime: RuntimeConfig {
            nats_url: nats.url(),
            s3_endpoint: Some(s3_server.endpoint()),
            s3_access_key_id: Some(s3_server.access_key().to_owned()),
            s3_secret_access_key: Some(s3_server.secret_key().to_owned()),
            bucket: BUCKET.to_owned(),
            ..RuntimeConfig::default()
        },
        ..IngestConfig::default()
    };
    let relay = darkroom_ingest::connect(&config)
        .await
        .map_err(|e| anyhow!("connect: {e}"))?;

    println!(
        "# Reconciler sweep cost\n\n{} objects PUT, {} at a time",
        args.objects, args.concurrency
    );
    let put_time = put_many(&s3, "old", args.objects, args.concurrency).await?;
    println!("PUT phase: {:.1} s", put_time.as_secs_f64());

    let mut rows = Vec::new();
    let mut watermark = Watermark::default();
    let first = timed_sweep(&relay, &mut watermark).await?;
    rows.push(("first sweep, nothing known (examine + relay all)", first));
    let full = timed_sweep(&relay, &mut Watermark::default()).await?;
    rows.push(("full re-examination, all known (every sweep before)", full));
    let idle = timed_sweep(&relay, &mut watermark).await?;
    rows.push(("watermark, nothing new", idle));
    // New uploads land in a later second than everything examined so far.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_many(&s3, "new", args.new, args.concurrency).await?;
    let fresh = timed_sweep(&relay, &mut watermark).await?;
    rows.push(("watermark, after the new uploads", fresh));

    println!(
        "\n| sweep | listed | examined (KV read, HEAD if no record) | relayed | seconds |\n\
         |---|---:|---:|---:|---:|"
    );
    for (label, (report, took)) in &rows {
        println!(
            "| {label} | {} | {} | {} | {:.2} |",
            report.listed,
            report.examined,
            report.published,
            took.as_secs_f64()
        );
    }
    let (idle_report, _) = idle;
    let (fresh_report, _) = fresh;
    // S3 dates objects to the second: those of the newest second are examined again.
    if idle_report.examined * 20 > idle_report.listed.max(20) || fresh_report.published != args.new
    {
        bail!(
            "the watermark did not hold: {} of {} examined with nothing new, {} of {} new relayed",
            idle_report.examined,
            idle_report.listed,
            fresh_report.published,
            args.new
        );
    }
    Ok(())
}
