//! The ruleset's lifecycle in `run --nft`: prepared (translated, checked by
//! nft's dry run) before anything is attached, loaded after attaching, and
//! replaced by `reload`.

use std::path::Path;

use anyhow::{bail, Result};

use crate::policy::nft::{self, Ruleset};

use super::{ports, Core};

/// Dry-run a translated ruleset that is to replace the tables in
/// `replace`. It must declare a flowtable, or nothing would be offloaded.
pub fn prepare(rs: Ruleset, replace: &[(String, String)]) -> Result<Ruleset> {
    if rs.translated.flowtables.is_empty() {
        bail!(
            "{} declares no flowtable, so nothing would be offloaded: add one \
             (flowtable ft {{ hook ingress priority 0; devices = {{ lan0, wan0 }}; }}) \
             and `flow add @ft` in the forward chain",
            rs.name
        );
    }
    // nft's dry run first: a ruleset nft rejects loads nothing and attaches
    // nothing.
    rs.apply(replace, true)?;
    announce(&rs);
    Ok(rs)
}

pub fn label_bits(rs: Option<&Ruleset>) -> Vec<u32> {
    rs.map(|r| r.translated.flowtables.iter().map(|f| f.label_bit).collect()).unwrap_or_default()
}

fn announce(rs: &Ruleset) {
    for ft in &rs.translated.flowtables {
        if ft.hw_offload {
            // As firewall4 does when flow_offloading_hw finds no driver.
            tracing::warn!(
                flowtable = %ft.name,
                "`flags offload` asks for hardware offload; no hardware backend here, using software (eBPF) offload"
            );
        }
    }
    if Path::new("/sys/module/nf_flow_table").exists() {
        tracing::info!(
            "this kernel has nf_flow_table; the ruleset's flowtables are handled by nft-offload instead \
             (they are not created in the kernel, so the two never offload the same connection)"
        );
    }
}

impl Core {
    /// Replace the ruleset of a running `run --nft` with one a client sent
    /// (`name` labels messages): check, attach new devices, load
    /// atomically, detach devices that left, and send every offloaded
    /// connection back through the new rules.
    pub(super) fn reload(&mut self, name: &str, text: &str) -> Result<String> {
        if self.ruleset.is_none() {
            bail!("this engine was started with --iface, not --nft: there is no ruleset to reload");
        }
        self.replace_ruleset(Ruleset::from_client(name, text)?)
    }

    /// Put `rs` in the place of the running ruleset, all or nothing.
    pub(super) fn replace_ruleset(&mut self, rs: Ruleset) -> Result<String> {
        let Some(old) = self.ruleset.clone() else {
            bail!("this engine was started with --iface, not --nft: there is no ruleset to reload");
        };
        let name = rs.name.clone();
        let name = name.as_str();
        let rs = prepare(rs, &old.translated.tables)?;
        let wanted = rs.devices();
        let new: Vec<String> = wanted.iter().filter(|n| !self.ifaces.has(n)).cloned().collect();
        let infos = ports::gather(&new)?;
        let rollback = |e: anyhow::Error| e.context("reload aborted, the previous ruleset stays");
        let added =
            self.ifaces.attach(self.flows.dp_mut(), &infos, &self.facts.topo, self.cfg.mode).map_err(rollback)?;
        match rs.apply(&old.translated.tables, false) {
            Ok(pid) => {
                // Ours from here: its notifications are not someone else's.
                self.own_nft.push(pid);
                let n = self.own_nft.len();
                self.own_nft.drain(..n.saturating_sub(8));
                self.ruleset_foreign = false;
            }
            Err(e) => {
                self.ifaces.detach(self.flows.dp_mut(), &added);
                return Err(rollback(e));
            }
        }
        // Every connection goes back to the kernel and returns only if the
        // new rules send it to `flow add` again: first those we handle, then
        // entries that carry the old label but were not offloaded yet.
        let n = self.flows.send_all_back();
        if let Ok(all) = self.flows.ct.dump() {
            let bits = label_bits(Some(&old));
            for e in all.iter().filter(|e| bits.iter().any(|b| nft::has_label(e.labels.as_ref(), *b))) {
                self.flows.forget_offload_request(e);
            }
        }
        let removed = self.ifaces.keep_only(&wanted);
        self.ifaces.detach(self.flows.dp_mut(), &removed);
        self.pppoe_uppers.retain(|i| !removed.contains(i));
        self.sync_pppoe_uppers();
        self.flows.set_label_bits(label_bits(Some(&rs)));
        self.ruleset = Some(rs);
        // The ports changed, and the new ruleset may carry device chains
        // (its notifications arrive too; the ports do not).
        self.read_hooks();
        tracing::info!(file = name, reoffload = n, "ruleset reloaded");
        Ok(format!(
            "reloaded {name}: {} interface(s) added, {} removed, {} offloaded connection(s) sent back through the new rules",
            added.len(),
            removed.len(),
            n
        ))
    }
}
