use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NFT_OFFLOAD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = nft_offload::cli::Cli::parse();
    if let Err(e) = nft_offload::cli::main_with(cli) {
        eprintln!("nft-offload: error: {e:#}");
        std::process::exit(1);
    }
}
