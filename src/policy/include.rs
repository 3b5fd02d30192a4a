//! `reload --nft FILE` on a ruleset with `include` statements: the client
//! reads the included files itself, with its own permissions, and sends one
//! text. The engine never opens a file for a client (nft runs as root and
//! would read, and quote in its errors, anything named), so an include the
//! caller cannot read fails here, as `nft -f` run by that caller would.
//!
//! Mirrors nft's include rules (its scanner's include handling,
//! libnftables): an absolute name or one starting with `./` is taken as
//! is; any other is searched in the including file's directory (the `-I`
//! the engine gives nft for its own file) and then nft's default include
//! directory; shell wildcards in the last component match in sorted order,
//! and matching nothing is not an error then; nesting stops at 16.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::nft::include_statements;

/// nft's default include directory (its sysconfdir, /etc on Debian and
/// OpenWrt).
const DEFAULT_DIR: &str = "/etc";
/// nft's MAX_INCLUDE_DEPTH.
const MAX_DEPTH: usize = 16;

/// The text of the ruleset file `path` with every include replaced by the
/// files it names, read by this process.
pub fn read_inlined(path: &Path) -> Result<String> {
    Ok(read_mapped(path)?.text)
}

/// An inlined ruleset and where each of its lines came from, so that an
/// error nft reports at a line of the whole text names the file the user
/// wrote (`/etc/nftables.d/10-mine.nft:3`) rather than the assembled one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inlined {
    pub text: String,
    /// Each piece of `text` copied from a file: (first line in `text`,
    /// file, its line there), in order; 1-based.
    pieces: Vec<(usize, PathBuf, usize)>,
}

impl Inlined {
    /// The file and line that line `line` (1-based) of `text` came from.
    pub fn origin(&self, line: usize) -> Option<(&Path, usize)> {
        let i = self.pieces.partition_point(|p| p.0 <= line).checked_sub(1)?;
        let (at, file, from) = &self.pieces[i];
        Some((file.as_path(), from + (line - at)))
    }

    /// Whether any include was inlined (else `text` is the file as read).
    pub fn had_includes(&self) -> bool {
        self.pieces.iter().any(|p| p.1 != self.pieces[0].1)
    }
}

/// `read_inlined`, keeping the origin of every line.
pub fn read_mapped(path: &Path) -> Result<Inlined> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    inline(path, &text, 0)
}

fn lines_before(text: &str, at: usize) -> usize {
    text[..at].bytes().filter(|&b| b == b'\n').count()
}

fn inline(path: &Path, text: &str, depth: usize) -> Result<Inlined> {
    let incs = include_statements(text);
    let mut out = Inlined { text: String::with_capacity(text.len()), pieces: vec![(1, path.to_path_buf(), 1)] };
    if incs.is_empty() {
        out.text.push_str(text);
        return Ok(out);
    }
    if depth >= MAX_DEPTH {
        bail!("{}: includes nested deeper than {MAX_DEPTH} (nft's limit)", path.display());
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut at = 0;
    // A piece of this file resumes at `from`; recorded only if it differs
    // from where the lines already point.
    let resume = |out: &mut Inlined, from: usize| {
        let here = lines_before(&out.text, out.text.len()) + 1;
        let want = lines_before(text, from) + 1;
        if out.origin(here) != Some((path, want)) {
            out.pieces.push((here, path.to_path_buf(), want));
        }
    };
    for (range, name) in incs {
        out.text.push_str(&text[at..range.start]);
        at = range.end;
        for file in resolve(dir, &name).with_context(|| format!("{}: include \"{name}\"", path.display()))? {
            let body = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: include \"{name}\": cannot read {}", path.display(), file.display()))?;
            let inner = inline(&file, &body, depth + 1)?;
            let base = lines_before(&out.text, out.text.len());
            out.pieces.extend(inner.pieces.into_iter().map(|(l, f, n)| (base + l, f, n)));
            out.text.push_str(&inner.text);
            out.text.push('\n');
        }
        resume(&mut out, at);
    }
    out.text.push_str(&text[at..]);
    Ok(out)
}

/// The files an include names, in the order nft reads them.
fn resolve(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let candidates: Vec<PathBuf> = if name.starts_with('/') || name.starts_with("./") {
        vec![PathBuf::from(name)]
    } else {
        vec![dir.join(name), Path::new(DEFAULT_DIR).join(name)]
    };
    let wild = name.contains(['*', '?', '[']);
    for c in &candidates {
        if !wild {
            if c.is_file() {
                return Ok(vec![c.clone()]);
            }
            continue;
        }
        let (Some(parent), Some(pattern)) = (c.parent(), c.file_name().and_then(|f| f.to_str())) else { continue };
        let Ok(entries) = std::fs::read_dir(parent) else { continue };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| !n.starts_with('.') && matches(pattern, n)))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        if !found.is_empty() {
            found.sort();
            return Ok(found);
        }
    }
    if wild {
        return Ok(Vec::new());
    }
    bail!(
        "no such file (looked for {})",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Shell wildcard match of one path component: `*`, `?`, `[abc]`, `[a-z]`,
/// `[!a]`.
fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && go(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let (neg, set) = match p[1] {
                    '!' | '^' => (true, &p[2..close]),
                    _ => (false, &p[1..close]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= (set[i]..=set[i + 2]).contains(&c);
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != neg && go(&p[close + 1..], &n[1..])
            }
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        for (p, n, want) in [
            ("*.nft", "10-lan.nft", true),
            ("*.nft", "lan.nft.bak", false),
            ("?0-*", "10-x", true),
            ("[0-9]*", "5x", true),
            ("[!0-9]*", "5x", false),
            ("a[bc]d", "acd", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(matches(p, n), want, "{p} ~ {n}");
        }
    }

    #[test]
    fn includes_are_read_here_and_inlined_in_place() {
        let dir = std::env::temp_dir().join(format!("nft-offload-include-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/20-b.nft"), "define B = 2\n").unwrap();
        std::fs::write(dir.join("d/10-a.nft"), "include \"../inner.nft\"\n").unwrap();
        std::fs::write(dir.join("inner.nft"), "define A = 1\n").unwrap();
        std::fs::write(dir.join("d/skip.txt"), "not nft\n").unwrap();
        let main = dir.join("main.nft");
        std::fs::write(&main, "# include \"nothing.nft\"\ninclude \"d/*.nft\"\ntable inet t {\n}\n").unwrap();
        let text = read_inlined(&main).unwrap();
        // Sorted, nested resolved from the including file, comments alone.
        assert_eq!(text, "# include \"nothing.nft\"\ndefine A = 1\n\n\n\ndefine B = 2\n\n\ntable inet t {\n}\n");
        assert!(include_statements(&text).is_empty());

        // Every line names the file and line it came from.
        let m = read_mapped(&main).unwrap();
        assert!(m.had_includes());
        let inner = dir.join("d/../inner.nft");
        assert_eq!(m.origin(1), Some((main.as_path(), 1)));
        assert_eq!(m.origin(2), Some((inner.as_path(), 1)));
        assert_eq!(m.origin(6), Some((dir.join("d/20-b.nft").as_path(), 1)));
        assert_eq!(m.origin(9), Some((main.as_path(), 3)));
        assert_eq!(m.origin(10), Some((main.as_path(), 4)));
        std::fs::write(dir.join("plain.nft"), "table inet t {\n}\n").unwrap();
        let plain = read_mapped(&dir.join("plain.nft")).unwrap();
        assert!(!plain.had_includes());
        assert_eq!(plain.origin(2), Some((dir.join("plain.nft").as_path(), 2)));

        // A wildcard matching nothing is nothing; a missing file is an error.
        std::fs::write(&main, "include \"none/*.nft\"\n").unwrap();
        assert_eq!(read_inlined(&main).unwrap(), "\n");
        std::fs::write(&main, "include \"missing.nft\"\n").unwrap();
        let e = format!("{:#}", read_inlined(&main).unwrap_err());
        assert!(e.contains("include \"missing.nft\"") && e.contains("no such file"), "{e}");

        // A loop stops at nft's depth.
        std::fs::write(&main, "include \"main.nft\"\n").unwrap();
        let e = format!("{:#}", read_inlined(&main).unwrap_err());
        assert!(e.contains("nested deeper than 16"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
