//! `darkroom-inference`: the GPU worker. Loads the SDXL model named by `DARKROOM_MODEL`, then
//! consumes the jobs stream until SIGINT/SIGTERM (finishing or handing back the job in hand).
//! Settings come from `DARKROOM_*` variables or the file named by `DARKROOM_CONFIG` (see
//! `WorkerConfig`).

fn main() -> anyhow::Result<()> {
    darkroom_inference_worker::cli::main()
}
