use clap::Parser;

fn main() {
    // Allocations from 256 KiB up (the engine's connection tables) are
    // mmapped, so a table that grows gives its old memory back. glibc's
    // default threshold rises to 32 MiB after the first large free, after
    // which tables grow inside the heap and leave holes it does not return
    // (measured by the bench's daemon memory figure).
    // SAFETY: mallopt only sets an allocator parameter.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let cli = nft_offload::cli::Cli::parse();
    nft_offload::init_logging_at(cli.verbosity());
    if let Err(e) = nft_offload::cli::main_with(cli) {
        eprintln!("nft-offload: error: {}", nft_offload::error_text(&e));
        std::process::exit(nft_offload::cli::exit_code(&e));
    }
}
