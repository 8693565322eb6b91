//! The `darkroom` program; everything is in the library (`darkroom_cli`).

fn main() -> std::process::ExitCode {
    darkroom_cli::main()
}
