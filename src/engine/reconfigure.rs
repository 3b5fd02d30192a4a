//! `reload` without a file, and SIGHUP (systemd's ExecReload, procd's
//! reload): the engine reads the files it was started with again, as root
//! read them at start (so a ruleset's `include` works as with `nft -f`),
//! and applies what a running engine can take. All or nothing: a file that
//! does not parse, a change that needs a restart or a ruleset nft refuses
//! leaves everything as it was.

use anyhow::{bail, Context, Result};

use crate::policy::nft::Ruleset;
use crate::settings::Settings;

use super::Core;

/// Reads the settings again from where they came from: the `--config` file
/// (with the start's flags on top) and the ruleset file it or `--nft`
/// names.
pub type Reread = Box<dyn Fn() -> Result<Settings>>;

/// The settings a running engine cannot change (its maps, programs and
/// ports were made for them): the names of those that differ.
pub fn needs_restart(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut v = Vec::new();
    if new.ifaces != old.ifaces {
        v.push("interfaces");
    }
    if new.nft.is_some() != old.nft.is_some() {
        v.push("ruleset (an engine runs from a ruleset or from an interface list, not both)");
    }
    if new.mode != old.mode {
        v.push("mode");
    }
    if new.max_flows != old.max_flows {
        v.push("max_flows");
    }
    if new.keepalive != old.keepalive {
        v.push("keepalive");
    }
    if new.metrics != old.metrics {
        v.push("metrics");
    }
    v
}

impl Core {
    /// Read the start's files again and apply them: the ruleset (replaced
    /// atomically, only if its text changed), the idle timeout and the
    /// exclusions (every connection judged again under them). Returns a
    /// one-line summary.
    pub(super) fn reload_files(&mut self) -> Result<String> {
        let Some(reread) = &self.reread else {
            bail!(
                "this engine was started from flags only: there is no file to read again \
                 (restart it to change its settings, or start it with --config or --nft)"
            );
        };
        let new = reread().context("reload aborted, the running settings stay")?;
        let fixed = needs_restart(&self.given, &new);
        if !fixed.is_empty() {
            bail!("{} changed: restart the engine to apply that (nothing was changed)", fixed.join(", "));
        }
        let mut done = Vec::new();
        if let Some(path) = &new.nft {
            let rs = Ruleset::read(path).context("reload aborted, the running settings stay")?;
            let same =
                self.ruleset.as_ref().is_some_and(|o| o.name == rs.name && o.translated.text == rs.translated.text);
            // The same text is left alone only if the kernel still has it:
            // after someone else's change (firewall4 reloading its own
            // table) it is loaded again.
            if same && !self.ruleset_foreign {
                done.push(format!("{} unchanged", rs.name));
            } else {
                done.push(self.replace_ruleset(rs).context("reload aborted, the running settings stay")?);
            }
        }
        if new.idle_timeout != self.cfg.idle_timeout {
            self.cfg.idle_timeout = new.idle_timeout;
            done.push(format!("idle timeout {} s", new.idle_timeout.as_secs()));
        }
        if new.exclude != self.cfg.exclude {
            self.cfg.exclude = new.exclude.clone();
            // Offloaded connections are judged only on news about them:
            // judge each now. The rest (dormant, waiting, and those the old
            // exclusions kept off) come from conntrack's table.
            let ids = self.flows.offloaded_ids();
            self.flows.begin_batch();
            for id in &ids {
                self.rejudge(id, None, false);
            }
            self.flows.end_batch();
            self.resync().context("reading conntrack's table under the new exclusions")?;
            let (now, _, _) = self.flows.len();
            done.push(format!("exclusions changed: {} connection(s) judged again, {now} offloaded now", ids.len()));
        }
        self.given = new;
        if done.is_empty() {
            done.push("nothing changed".into());
        }
        let summary = format!("reloaded: {}", done.join("; "));
        tracing::info!("{summary}");
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::tests::flags;
    use crate::settings::{validate, Given, SettingsInput};

    #[test]
    fn what_a_running_engine_cannot_take_is_named() {
        let base = validate(flags(&["lan0", "wan0"])).unwrap();
        assert!(needs_restart(&base, &base.clone()).is_empty());
        let with = |f: &dyn Fn(&mut SettingsInput)| {
            let mut i = flags(&["lan0", "wan0"]);
            f(&mut i);
            validate(i).unwrap()
        };
        let idle = with(&|i| i.idle_timeout = Some(Given::flag("--idle-timeout", 5)));
        assert!(needs_restart(&base, &idle).is_empty(), "the idle timeout is applied live");
        let more = validate(flags(&["lan0", "wan0", "wan1"])).unwrap();
        assert_eq!(needs_restart(&base, &more), ["interfaces"]);
        let xdp = with(&|i| i.mode = Some(Given::flag("--mode", crate::policy::ModeChoice::Xdp)));
        assert_eq!(needs_restart(&base, &xdp), ["mode"]);
        let big = with(&|i| i.max_flows = Some(Given::flag("--max-flows", 4096)));
        assert_eq!(needs_restart(&base, &big), ["max_flows"]);
        let nft =
            validate(SettingsInput { nft: Some(Given::flag("--nft", "fw.nft".into())), ..Default::default() }).unwrap();
        let v = needs_restart(&base, &nft);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[1].starts_with("ruleset"), "{v:?}");
    }
}
