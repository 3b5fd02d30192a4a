//! nftables rulesets written for the kernel flowtable (kmod-nft-offload,
//! firewall4's `flow_offloading`), loaded unchanged in meaning on kernels
//! without nf_flow_table.
//!
//! The kernel keeps evaluating the user's rules; we only change what the
//! `flow add @ft` / `flow offload @ft` statement does: instead of handing the
//! connection to nf_flow_table it sets one conntrack label bit per flowtable
//! (`ct label set N`), which the engine reads. Labels leave the user's marks
//! alone. `flowtable` declarations are blanked (the kernel would refuse them
//! without nf_flow_table); their devices become the engine's interfaces.
//! Every line keeps its number, so nft's own error messages point at the
//! user's file.

use std::fmt;

/// Label bits used for flowtables, from the top of the 128-bit label space
/// down (users number their own labels from 0 in connlabel.conf).
pub const FIRST_LABEL_BIT: u32 = 127;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flowtable {
    pub family: String,
    pub table: String,
    pub name: String,
    pub devices: Vec<String>,
    /// `flags offload;`: hardware offload requested.
    pub hw_offload: bool,
    pub counter: bool,
    /// Conntrack label bit set by this flowtable's `flow add` statements.
    pub label_bit: u32,
    /// 1-based line of the declaration.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The ruleset to load: same lines as the input.
    pub text: String,
    pub flowtables: Vec<Flowtable>,
    /// Number of `flow add|offload` statements rewritten.
    pub offload_statements: usize,
    /// Tables the file declares (family, name), so a reload can replace them.
    pub tables: Vec<(String, String)>,
    /// Lines of `include` statements (nft would open those files).
    pub includes: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftError {
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for NftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for NftError {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
    Semi,
    Newline,
    Other(char),
}

#[derive(Debug, Clone)]
struct Token {
    t: Tok,
    start: usize,
    end: usize,
    line: usize,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | '$' | '/' | ':' | '*' | '\\')
}

/// Tokens with byte offsets; comments dropped, strings kept whole.
fn tokenize(src: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let b: Vec<(usize, char)> = src.char_indices().collect();
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        let (pos, c) = b[i];
        match c {
            '\n' => {
                out.push(Token { t: Tok::Newline, start: pos, end: pos + 1, line });
                line += 1;
                i += 1;
            }
            '#' => {
                while i < b.len() && b[i].1 != '\n' {
                    i += 1;
                }
            }
            '"' => {
                let mut j = i + 1;
                let mut s = String::new();
                while j < b.len() && b[j].1 != '"' && b[j].1 != '\n' {
                    s.push(b[j].1);
                    j += 1;
                }
                let end = if j < b.len() { b[j].0 + 1 } else { src.len() };
                out.push(Token { t: Tok::Str(s), start: pos, end, line });
                i = j + 1;
            }
            '{' => {
                out.push(Token { t: Tok::Open, start: pos, end: pos + 1, line });
                i += 1;
            }
            '}' => {
                out.push(Token { t: Tok::Close, start: pos, end: pos + 1, line });
                i += 1;
            }
            ';' => {
                out.push(Token { t: Tok::Semi, start: pos, end: pos + 1, line });
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            c if is_word(c) => {
                let mut j = i;
                let mut s = String::new();
                while j < b.len() && is_word(b[j].1) {
                    s.push(b[j].1);
                    j += 1;
                }
                let end = if j < b.len() { b[j].0 } else { src.len() };
                out.push(Token { t: Tok::Word(s), start: pos, end, line });
                i = j;
            }
            c => {
                out.push(Token { t: Tok::Other(c), start: pos, end: pos + c.len_utf8(), line });
                i += 1;
            }
        }
    }
    out
}

const FAMILIES: [&str; 6] = ["ip", "ip6", "inet", "arp", "bridge", "netdev"];

fn word(t: &Token) -> Option<&str> {
    match &t.t {
        Tok::Word(w) => Some(w),
        Tok::Str(s) => Some(s),
        _ => None,
    }
}

/// Index of the `}` matching the `{` at `open`.
fn matching_close(toks: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (k, t) in toks.iter().enumerate().skip(open) {
        match t.t {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// Parse the body of a flowtable block (tokens strictly inside the braces).
fn parse_flowtable_body(body: &[Token], ft: &mut Flowtable) -> Result<(), NftError> {
    let mut k = 0;
    while k < body.len() {
        match word(&body[k]) {
            Some("devices") => {
                // devices = { a, "b" }  |  devices = a
                let mut j = k + 1;
                if matches!(body.get(j).map(|t| &t.t), Some(Tok::Other('='))) {
                    j += 1;
                }
                if matches!(body.get(j).map(|t| &t.t), Some(Tok::Open)) {
                    j += 1;
                    while j < body.len() && body[j].t != Tok::Close {
                        if let Some(w) = word(&body[j]) {
                            ft.devices.push(w.to_string());
                        }
                        j += 1;
                    }
                } else if let Some(w) = body.get(j).and_then(word) {
                    ft.devices.push(w.to_string());
                }
                k = j + 1;
            }
            Some("counter") => {
                ft.counter = true;
                k += 1;
            }
            Some("flags") => {
                let mut j = k + 1;
                while j < body.len() && !matches!(body[j].t, Tok::Semi | Tok::Newline | Tok::Close) {
                    if word(&body[j]) == Some("offload") {
                        ft.hw_offload = true;
                    }
                    j += 1;
                }
                k = j;
            }
            _ => k += 1,
        }
    }
    if ft.devices.is_empty() {
        return Err(NftError { line: ft.line, msg: format!("flowtable {} has no devices", ft.name) });
    }
    ft.devices.sort();
    ft.devices.dedup();
    Ok(())
}

/// Replace bytes in `range` by spaces, keeping newlines (line numbers stay).
fn blank(out: &mut [u8], start: usize, end: usize) {
    for b in &mut out[start..end] {
        if *b != b'\n' {
            *b = b' ';
        }
    }
}

pub fn translate(src: &str) -> Result<Translated, NftError> {
    let toks = tokenize(src);
    let mut out = src.as_bytes().to_vec();
    let mut flowtables: Vec<Flowtable> = Vec::new();
    let mut tables = Vec::new();
    // (byte start, byte end, replacement) for statements; applied last.
    let mut rewrites: Vec<(usize, usize, String)> = Vec::new();
    // Stack of (table family, table name) for block syntax, with the brace
    // depth at which the table opened.
    let mut table_stack: Vec<(String, String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_refs: Vec<(String, usize, usize, usize)> = Vec::new();

    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i];
        match &t.t {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if table_stack.last().is_some_and(|(_, _, d)| *d == depth) {
                    table_stack.pop();
                }
            }
            Tok::Word(w) if w == "table" && depth == 0 => {
                // table [family] name {
                let a = toks.get(i + 1).and_then(word);
                let b = toks.get(i + 2).and_then(word);
                let (fam, name, next) = match (a, b) {
                    (Some(f), Some(n)) if FAMILIES.contains(&f) => (f.to_string(), n.to_string(), i + 3),
                    (Some(n), _) => ("ip".to_string(), n.to_string(), i + 2),
                    _ => {
                        i += 1;
                        continue;
                    }
                };
                if !tables.contains(&(fam.clone(), name.clone())) {
                    tables.push((fam.clone(), name.clone()));
                }
                if matches!(toks.get(next).map(|t| &t.t), Some(Tok::Open)) {
                    table_stack.push((fam, name, depth));
                }
            }
            Tok::Word(w) if w == "flowtable" => {
                // Block form inside a table, or `add|create flowtable fam table name {`
                let is_cmd = i > 0 && matches!(word(&toks[i - 1]), Some("add" | "create"));
                let (fam, table, name_idx) = if is_cmd {
                    let a = toks.get(i + 1).and_then(word);
                    match a {
                        Some(f) if FAMILIES.contains(&f) => {
                            (f.to_string(), toks.get(i + 2).and_then(word).unwrap_or("").to_string(), i + 3)
                        }
                        Some(tn) => ("ip".to_string(), tn.to_string(), i + 2),
                        None => (String::new(), String::new(), i + 1),
                    }
                } else if let Some((f, n, _)) = table_stack.last() {
                    (f.clone(), n.clone(), i + 1)
                } else {
                    i += 1;
                    continue;
                };
                let Some(name) = toks.get(name_idx).and_then(word).map(str::to_string) else {
                    return Err(NftError { line: t.line, msg: "flowtable without a name".into() });
                };
                let start = if is_cmd { toks[i - 1].start } else { t.start };
                if !matches!(toks.get(name_idx + 1).map(|t| &t.t), Some(Tok::Open)) {
                    // `delete flowtable ...` and the like: drop the command.
                    let mut j = name_idx + 1;
                    while j < toks.len() && !matches!(toks[j].t, Tok::Newline | Tok::Semi) {
                        j += 1;
                    }
                    let from = if i > 0 && word(&toks[i - 1]).is_some() { toks[i - 1].start } else { start };
                    let end = toks.get(j).map(|t| t.start).unwrap_or(src.len());
                    blank(&mut out, from, end);
                    i = j;
                    continue;
                }
                let open = name_idx + 1;
                let Some(close) = matching_close(&toks, open) else {
                    return Err(NftError { line: t.line, msg: format!("flowtable {name}: missing '}}'") });
                };
                let mut ft = Flowtable {
                    family: fam,
                    table,
                    name,
                    devices: Vec::new(),
                    hw_offload: false,
                    counter: false,
                    label_bit: 0,
                    line: t.line,
                };
                parse_flowtable_body(&toks[open + 1..close], &mut ft)?;
                if flowtables.iter().any(|f| f.family == ft.family && f.table == ft.table && f.name == ft.name) {
                    return Err(NftError { line: t.line, msg: format!("flowtable {} declared twice", ft.name) });
                }
                ft.label_bit = FIRST_LABEL_BIT - flowtables.len() as u32;
                let mut end = toks[close].end;
                if matches!(toks.get(close + 1).map(|t| &t.t), Some(Tok::Semi)) {
                    end = toks[close + 1].end;
                }
                blank(&mut out, start, end);
                flowtables.push(ft);
                i = close + 1;
                continue;
            }
            Tok::Word(w) if w == "flow" => {
                // flow add @name | flow offload @name
                let verb = toks.get(i + 1).and_then(word);
                let target = toks.get(i + 2).and_then(word);
                if let (Some("add" | "offload"), Some(tg)) = (verb, target) {
                    if let Some(name) = tg.strip_prefix('@') {
                        let (fam, table) =
                            table_stack.last().map(|(f, n, _)| (f.clone(), n.clone())).unwrap_or_default();
                        let _ = fam;
                        pending_refs.push((name.to_string(), t.start, toks[i + 2].end, t.line));
                        let _ = table;
                        i += 3;
                        continue;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    for (name, start, end, line) in &pending_refs {
        let Some(ft) = flowtables.iter().find(|f| &f.name == name) else {
            return Err(NftError { line: *line, msg: format!("flow offload to unknown flowtable @{name}") });
        };
        rewrites.push((*start, *end, format!("ct label set {}", ft.label_bit)));
    }
    // Apply statement rewrites back to front so offsets stay valid.
    rewrites.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut text = String::from_utf8(out).expect("blanking keeps UTF-8");
    for (s, e, r) in &rewrites {
        text.replace_range(*s..*e, r);
    }
    let includes = include_lines(&toks);
    Ok(Translated { text, flowtables, offload_statements: pending_refs.len(), tables, includes })
}

/// Each `include "FILE"` statement: the byte range of the statement (the
/// word and its string) and the string, for `include::inline`. An include
/// whose argument is not a string is left to nft, which rejects it.
pub(crate) fn include_statements(src: &str) -> Vec<(std::ops::Range<usize>, String)> {
    let toks = tokenize(src);
    let mut at_start = true;
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match &t.t {
            Tok::Newline | Tok::Semi | Tok::Open | Tok::Close => at_start = true,
            Tok::Word(w) if at_start && w.eq_ignore_ascii_case("include") => {
                if let Some(Token { t: Tok::Str(path), end, .. }) = toks.get(i + 1) {
                    out.push((t.start..*end, path.clone()));
                }
                at_start = false;
            }
            _ => at_start = false,
        }
    }
    out
}

/// Lines where a statement starts with `include` (nft opens the named
/// file, with the privileges of whoever runs nft).
fn include_lines(toks: &[Token]) -> Vec<usize> {
    let mut at_start = true;
    let mut lines = Vec::new();
    for t in toks {
        match &t.t {
            Tok::Newline | Tok::Semi | Tok::Open | Tok::Close => at_start = true,
            Tok::Word(w) if at_start && w.eq_ignore_ascii_case("include") => {
                lines.push(t.line);
                at_start = false;
            }
            _ => at_start = false,
        }
    }
    lines
}

/// The flowtable label bits as a 16-byte mask (conntrack label layout: bit n
/// is bit n%8 of byte n/8, as `nf_connlabel_set` uses set_bit on longs, which
/// is little-endian bit order on the wire for x86 and all LE machines).
pub fn label_mask(bits: &[u32]) -> [u8; 16] {
    let mut m = [0u8; 16];
    for &b in bits {
        if b < 128 {
            m[(b / 8) as usize] |= 1 << (b % 8);
        }
    }
    m
}

pub fn has_label(labels: Option<&[u8; 16]>, bit: u32) -> bool {
    labels.is_some_and(|l| bit < 128 && l[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What firewall4 generates with flow_offloading=1 and _hw=1 (shape and
    /// order of the relevant parts).
    const FW4: &str = r#"table inet fw4
flush table inet fw4

table inet fw4 {
	#
	# Flowtable
	#

	flowtable ft {
		hook ingress priority 0;
		devices = { "br-lan", "eth0.2", "pppoe-wan" };
		counter;
		flags offload;
	}

	chain forward {
		type filter hook forward priority filter; policy drop;

		meta l4proto { tcp, udp } flow offload @ft comment "!fw4: Traffic offloading"
		ct state vmap { established : accept, related : accept, invalid : drop } comment "!fw4: Handle forwarded flows"
		iifname "br-lan" jump forward_lan comment "!fw4: Handle lan IPv4/IPv6 forward traffic"
	}
}
"#;

    #[test]
    fn firewall4_shape_is_translated_line_for_line() {
        let t = translate(FW4).unwrap();
        assert_eq!(t.text.lines().count(), FW4.lines().count());
        assert_eq!(t.flowtables.len(), 1);
        let ft = &t.flowtables[0];
        assert_eq!((ft.family.as_str(), ft.table.as_str(), ft.name.as_str()), ("inet", "fw4", "ft"));
        assert_eq!(ft.devices, vec!["br-lan", "eth0.2", "pppoe-wan"]);
        assert!(ft.hw_offload && ft.counter);
        assert_eq!(ft.line, 9);
        assert_eq!(ft.label_bit, 127);
        assert!(!t.text.contains("flowtable"));
        assert!(!t.text.contains("flow offload"));
        let n = FW4.lines().position(|l| l.contains("flow offload")).unwrap();
        let l = t.text.lines().nth(n).unwrap();
        assert_eq!(l.trim(), "meta l4proto { tcp, udp } ct label set 127 comment \"!fw4: Traffic offloading\"");
        assert_eq!(t.offload_statements, 1);
        assert_eq!(t.tables, vec![("inet".to_string(), "fw4".to_string())]);
        // everything else is byte-identical
        for (a, b) in FW4.lines().zip(t.text.lines()).filter(|(a, _)| !a.contains("flow")) {
            if !(9..=14).contains(&FW4.lines().position(|x| x == a).unwrap()) {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn ip_and_ip6_tables_and_flow_add() {
        let src = "table ip filter {\n flowtable f4 { hook ingress priority 10; devices = eth0; }\n chain fwd { type filter hook forward priority 0; ip protocol tcp flow add @f4; }\n}\ntable ip6 filter6 {\n flowtable f6 { hook ingress priority 0; devices = { eth1, eth2 } }\n chain forward { type filter hook forward priority 0; flow add @f6 }\n}\n";
        let t = translate(src).unwrap();
        assert_eq!(t.flowtables.len(), 2);
        assert_eq!(t.flowtables[0].family, "ip");
        assert_eq!(t.flowtables[0].devices, vec!["eth0"]);
        assert_eq!(t.flowtables[1].family, "ip6");
        assert_eq!(t.flowtables[1].devices, vec!["eth1", "eth2"]);
        assert_eq!(t.flowtables[1].label_bit, 126);
        assert!(t.text.contains("ip protocol tcp ct label set 127;"));
        assert!(t.text.contains("priority 0; ct label set 126 }"));
        assert!(!t.flowtables[0].hw_offload);
        assert_eq!(t.text.lines().count(), src.lines().count());
    }

    #[test]
    fn command_form_and_comments() {
        let src = "add table inet t\n# flow add @nope in a comment stays\nadd flowtable inet t ft { hook ingress priority 0; devices = { a, b }; }\nadd chain inet t f { type filter hook forward priority 0; }\nadd rule inet t f flow offload @ft\n";
        let t = translate(src).unwrap();
        assert_eq!(t.flowtables[0].table, "t");
        assert!(t.text.contains("# flow add @nope in a comment stays"));
        assert!(t.text.contains("add rule inet t f ct label set 127"));
        assert!(!t.text.contains("add flowtable"));
    }

    #[test]
    fn errors_name_the_line() {
        let e = translate("table inet t {\n chain c { flow add @missing }\n}\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.msg.contains("@missing"));
        let e = translate("table inet t {\n\n flowtable ft { hook ingress priority 0; }\n}\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.msg.contains("no devices"));
    }

    #[test]
    fn rulesets_without_flowtables_pass_through() {
        let src = "table inet t {\n chain c { type filter hook forward priority 0; accept }\n}\n";
        let t = translate(src).unwrap();
        assert_eq!(t.text, src);
        assert!(t.flowtables.is_empty());
    }

    #[test]
    fn include_statements_are_found() {
        let src = "include \"/etc/shadow\"\ntable inet t {\n chain c { include \"x\" }\n chain include { jump include; }\n comment \"include y\"\n}\n# include \"z\"\n;INCLUDE\"/etc/passwd\"\n";
        assert_eq!(translate(src).unwrap().includes, vec![1, 3, 8]);
        assert!(translate(FW4).unwrap().includes.is_empty());
    }

    /// firewall4's ruleset includes /etc/nftables.d/*.nft inside its table:
    /// a `flow offload @ft` there is the owner's own offload rule and must be
    /// translated like the template's; errors name the included file.
    #[test]
    fn root_files_translate_their_includes_and_errors_name_them() {
        let dir = std::env::temp_dir().join(format!("nft-offload-fw4-include-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("nftables.d")).unwrap();
        std::fs::write(
            dir.join("nftables.d/10-offload.nft"),
            "chain offload_big {\n\ttype filter hook forward priority filter - 1; policy accept;\n\tct original packets ge 30 flow offload @ft\n}\n",
        )
        .unwrap();
        let main = dir.join("fw4.nft");
        let text = FW4.replace("\tchain forward {", "\tinclude \"nftables.d/*.nft\"\n\tchain forward {");
        std::fs::write(&main, &text).unwrap();
        let rs = Ruleset::read(&main).unwrap();
        assert_eq!(rs.translated.offload_statements, 2);
        assert!(rs.translated.text.contains("ct original packets ge 30 ct label set 127"), "{}", rs.translated.text);
        assert!(rs.translated.includes.is_empty());
        // nft's location of a line in the included file, mapped back.
        let at = text.lines().position(|l| l.contains("include")).unwrap() + 1;
        let l = rs.located(&format!("/dev/stdin:{}:2-5: Error: syntax error", at + 2));
        assert_eq!(l, format!("{}:3:2-5: Error: syntax error", dir.join("nftables.d/10-offload.nft").display()));
        let l = rs.located("/dev/stdin:1:1-3: Error: x");
        assert_eq!(l, format!("{}:1:1-3: Error: x", main.display()));

        std::fs::write(dir.join("nftables.d/10-offload.nft"), "chain c {\n\tflow add @nosuch\n}\n").unwrap();
        let e = Ruleset::read(&main).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: ", dir.join("nftables.d/10-offload.nft").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn client_rulesets_may_not_include_and_name_no_file() {
        let e = Ruleset::from_client("mine.nft", "table inet t {\n}\ninclude \"/etc/shadow\"\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.starts_with("mine.nft:3: `include` is not accepted"), "{e}");
        assert!(!e.contains("shadow"), "the error must not echo the path: {e}");
        let rs = Ruleset::from_client("mine.nft", FW4).unwrap();
        assert_eq!(rs.name, "mine.nft");
        assert_eq!(rs.include_dir, None);
    }

    #[test]
    fn the_table_wrapper_keeps_the_users_line_numbers() {
        let rs = Ruleset::from_client("x", "table inet t {\n}\n").unwrap();
        let input = rs.nft_input(&[("inet".into(), "old".into())]);
        assert_eq!(
            input,
            "add table inet old; delete table inet old; add table inet t; delete table inet t; table inet t {\n}\n"
        );
        assert_eq!(input.lines().count(), 2);
    }

    #[test]
    fn label_bits() {
        let m = label_mask(&[127, 126, 0]);
        assert_eq!(m[15], 0xc0);
        assert_eq!(m[0], 0x01);
        assert!(has_label(Some(&m), 127));
        assert!(!has_label(Some(&m), 125));
        assert!(!has_label(None, 127));
    }
}

/// A ruleset, translated and ready to hand to nft.
#[derive(Debug, Clone)]
pub struct Ruleset {
    /// Where it came from, for messages: root's file, or the name a client
    /// gave (the path it read).
    pub name: String,
    /// Relative `include`s resolve here: only for root's own file.
    pub include_dir: Option<std::path::PathBuf>,
    pub translated: Translated,
    /// Root's own file with its includes inlined: where each line came from.
    origins: Option<super::include::Inlined>,
}

impl Ruleset {
    /// Read and translate the file `run --nft` was given (by root, who may
    /// read anything, so `include` works as with `nft -f`); errors name the
    /// file and line. Its includes are inlined first (as nft would read
    /// them), so a `flow add @ft` in an included file (firewall4's
    /// `include "/etc/nftables.d/*.nft"`) is translated too; errors name
    /// the included file and its line.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Ruleset> {
        let inlined = super::include::read_mapped(path).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let name = path.display().to_string();
        let origins = inlined.had_includes().then_some(inlined.clone());
        let translated = translate(&inlined.text).map_err(|e| {
            let at = match origins.as_ref().and_then(|o| o.origin(e.line)) {
                Some((file, line)) => format!("{}:{line}", file.display()),
                None => format!("{name}:{}", e.line),
            };
            anyhow::anyhow!("{at}: {}", e.msg)
        })?;
        let include_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(|p| p.to_path_buf());
        Ok(Ruleset { name, include_dir, translated, origins })
    }

    /// A ruleset a client sent over the control socket. nft runs as root,
    /// so an `include` would open a file the client may not be allowed to
    /// read (and nft's error would quote it): refused, naming only the line.
    pub fn from_client(name: &str, text: &str) -> anyhow::Result<Ruleset> {
        let rs = Ruleset::parse(name, text)?;
        if let Some(line) = rs.translated.includes.first() {
            anyhow::bail!(
                "{name}:{line}: `include` is not accepted in a ruleset sent to the engine (nft runs as root and \
                 would open the file for you): put the included rules into the file, or restart with `run --nft`"
            );
        }
        Ok(rs)
    }

    fn parse(name: &str, src: &str) -> anyhow::Result<Ruleset> {
        let translated = translate(src).map_err(|e| anyhow::anyhow!("{name}:{}: {}", e.line, e.msg))?;
        Ok(Ruleset { name: name.to_string(), include_dir: None, translated, origins: None })
    }

    /// Every device of every flowtable, in order of first appearance.
    pub fn devices(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for ft in &self.translated.flowtables {
            for d in &ft.devices {
                if !v.contains(d) {
                    v.push(d.clone());
                }
            }
        }
        v
    }

    /// What nft reads: the tables in `replace` and those the ruleset
    /// declares are deleted, then its contents added. The wrapper shares
    /// the first line (`;`-separated) so every line keeps its number.
    fn nft_input(&self, replace: &[(String, String)]) -> String {
        let mut tables: Vec<&(String, String)> = replace.iter().collect();
        for t in &self.translated.tables {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        let mut input = String::new();
        for (fam, name) in tables {
            // `add` first so the `delete` cannot fail on a missing table.
            input += &format!("add table {fam} {name}; delete table {fam} {name}; ");
        }
        input + &self.translated.text
    }

    /// Load into the kernel in one nft transaction (see `nft_input`), all
    /// or nothing. `check_only` runs nft's dry run (`-c`). The ruleset goes
    /// through nft's stdin: no file is written anywhere. Returns the pid of
    /// the nft that committed it (the port its change notifications carry,
    /// so the engine can tell its own changes from others').
    pub fn apply(&self, replace: &[(String, String)], check_only: bool) -> anyhow::Result<u32> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new("nft");
        if let Some(dir) = &self.include_dir {
            cmd.arg("-I").arg(dir);
        }
        if check_only {
            cmd.arg("-c");
        }
        cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot run nft: {e} (is nftables installed?)"))?;
        let pid = child.id();
        let input = self.nft_input(replace);
        let mut stdin = child.stdin.take().expect("piped stdin");
        // Written from a thread: nft may answer (and fill stderr) before it
        // has read everything.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().map_err(|e| anyhow::anyhow!("running nft: {e}"))?;
        let _ = writer.join();
        if !out.status.success() {
            // nft's own message, pointed back at the user's file (the
            // translation kept every line where it was).
            let err = String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with("In file included from"))
                .map(|l| self.located(l))
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!("nft rejected {} (nothing was loaded):\n{err}", self.name);
        }
        Ok(pid)
    }

    /// One line of nft's error output with its `/dev/stdin:LINE:` location
    /// pointed at the file (and, inlined, the included file) it came from.
    fn located(&self, l: &str) -> String {
        let Some(rest) = l.strip_prefix("/dev/stdin:") else { return l.to_string() };
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let line: Option<usize> = rest[..digits].parse().ok();
        match (line, self.origins.as_ref()) {
            (Some(n), Some(o)) => match o.origin(n) {
                Some((file, at)) => format!("{}:{at}{}", file.display(), &rest[digits..]),
                None => format!("{}:{rest}", self.name),
            },
            _ => format!("{}:{rest}", self.name),
        }
    }
}
