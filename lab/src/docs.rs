//! The router binary's man pages and shell completions, generated from its
//! clap definition (`nft_offload::cli::Cli`): the help text, the pages and
//! the completions cannot drift apart. Built here, not in the router
//! binary, so a router carries neither generator; the Debian package takes
//! the files from `./run.sh deb` (Cargo.toml `[package.metadata.deb]`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// Where each generated file goes inside `out` (the package's assets name
/// these paths).
pub const MAN_DIR: &str = "man";
pub const COMPLETIONS_DIR: &str = "completions";

/// Write `nft-offload.8.gz`, one `nft-offload-<cmd>.8.gz` per subcommand,
/// and bash, zsh and fish completions under `out`. Returns the files.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let cmd = nft_offload::cli::Cli::command();
    let name = cmd.get_name().to_string();
    let man = out.join(MAN_DIR);
    let comp = out.join(COMPLETIONS_DIR);
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut written = Vec::new();
    // Section 8: system administration commands (it needs root).
    let mut pages = vec![(name.clone(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let page = format!("{name}-{}", sub.get_name());
        // The page's NAME and SYNOPSIS say `nft-offload-run`; the command
        // is typed `nft-offload run`, which the synopsis shows through
        // the bin name.
        // (clap takes a name as &'static str without its "string" feature;
        // this runs once per page, for a short-lived generator.)
        let static_name: &'static str = Box::leak(page.clone().into_boxed_str());
        let sub = sub.clone().name(static_name).bin_name(format!("{name} {}", sub.get_name()));
        pages.push((page, sub));
    }
    for (page, c) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(c).section("8").render(&mut roff).with_context(|| format!("rendering {page}(8)"))?;
        let path = man.join(format!("{page}.8.gz"));
        write_gz(&path, &roff)?;
        written.push(path);
    }
    for (shell, file) in
        [(Shell::Bash, name.clone()), (Shell::Zsh, format!("_{name}")), (Shell::Fish, format!("{name}.fish"))]
    {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut nft_offload::cli::Cli::command(), &name, &mut buf);
        let path = comp.join(file);
        std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Gzip, reproducibly (no name, no time in the header), as Debian ships
/// man pages.
fn write_gz(path: &Path, data: &[u8]) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(f, flate2::Compression::best());
    gz.write_all(data).and_then(|_| gz.finish().map(drop)).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn gunzip(p: &Path) -> String {
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap()).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn pages_and_completions_come_from_the_cli_definition() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        let main = gunzip(&dir.path().join("man/nft-offload.8.gz"));
        assert!(main.contains(".TH nft-offload 8"), "{main}");
        // Every subcommand has its page, with its flags' help from clap.
        let subs = ["run", "reload", "check", "status", "hosts", "flows"];
        for sub in subs {
            assert!(main.contains(sub), "main page misses {sub}");
            let page = gunzip(&dir.path().join(format!("man/nft-offload-{sub}.8.gz")));
            assert!(page.contains(&format!(".TH nft-offload-{sub} 8")), "{page}");
        }
        let run = gunzip(&dir.path().join("man/nft-offload-run.8.gz"));
        for flag in ["\\-\\-iface", "\\-\\-config", "\\-\\-nft", "\\-\\-max\\-flows", "\\-\\-idle\\-timeout"] {
            assert!(run.contains(flag), "run page misses {flag}");
        }
        let bash = std::fs::read_to_string(dir.path().join("completions/nft-offload")).unwrap();
        assert!(bash.contains("--idle-timeout") && bash.contains("complete -F"), "{bash}");
        let zsh = std::fs::read_to_string(dir.path().join("completions/_nft-offload")).unwrap();
        assert!(zsh.starts_with("#compdef nft-offload"), "{zsh}");
        let fish = std::fs::read_to_string(dir.path().join("completions/nft-offload.fish")).unwrap();
        assert!(fish.contains("complete -c nft-offload"), "{fish}");
        assert_eq!(files.len(), 1 + subs.len() + 3, "a page each, three completions: {files:?}");
        // Reproducible: the same bytes twice.
        let again = tempfile::tempdir().unwrap();
        generate(again.path()).unwrap();
        for f in &files {
            let rel = f.strip_prefix(dir.path()).unwrap();
            assert_eq!(std::fs::read(f).unwrap(), std::fs::read(again.path().join(rel)).unwrap(), "{rel:?}");
        }
    }
}
