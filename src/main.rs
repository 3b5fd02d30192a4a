use clap::Parser;

fn main() {
    nft_offload::init_logging();
    let cli = nft_offload::cli::Cli::parse();
    if let Err(e) = nft_offload::cli::main_with(cli) {
        eprintln!("nft-offload: error: {e:#}");
        std::process::exit(1);
    }
}
