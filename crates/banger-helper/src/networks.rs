//! The network instances this helper set up, and for whom, kept on disk so a
//! restarted helper still knows them. A tap, route or teardown is allowed
//! only on an instance set up for the calling uid, and no two instances get
//! overlapping subnets.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use banger_host::{Instance, NetSetup, Subnet};
use serde::{Deserialize, Serialize};

use crate::policy::{Caller, Refusal};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    instance: String,
    uid: u32,
    subnet: String,
    dns_port: u16,
    domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<PathBuf>,
}

impl Record {
    fn setup(&self) -> Option<NetSetup> {
        Some(NetSetup {
            instance: Instance::parse(&self.instance).ok()?,
            subnet: Subnet::parse(&self.subnet).ok()?,
            dns_port: self.dns_port,
            domain: self.domain.clone(),
            owner: self.owner.clone(),
        })
    }
}

pub struct Networks {
    path: PathBuf,
    records: Mutex<Vec<Record>>,
}

impl Networks {
    pub fn load(path: &Path) -> Networks {
        let records = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Networks {
            path: path.to_path_buf(),
            records: Mutex::new(records),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `setup` for `caller` through `apply` and records it, if the
    /// instance is new or already theirs and its subnet overlaps no other
    /// instance's. The table stays locked while the host changes, so two
    /// callers cannot both take one subnet.
    pub fn set_up<E: From<Refusal>>(
        &self,
        caller: &Caller,
        setup: &NetSetup,
        apply: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut records = self.lock();
        let id = setup.instance.id();
        if let Some(r) = records
            .iter()
            .find(|r| r.instance == id && r.uid != caller.uid)
        {
            return Err(Refusal(format!(
                "network instance {id} belongs to uid {}, not to uid {}",
                r.uid, caller.uid
            ))
            .into());
        }
        for r in records.iter().filter(|r| r.instance != id) {
            let Ok(theirs) = Subnet::parse(&r.subnet) else {
                continue;
            };
            if theirs.overlaps(&setup.subnet) {
                return Err(Refusal(format!(
                    "subnet {} overlaps {theirs}, which another banger instance uses; pick \
                     another network.subnet in the config file",
                    setup.subnet
                ))
                .into());
            }
        }
        apply()?;
        records.retain(|r| r.instance != id);
        records.push(Record {
            instance: setup.instance.to_string(),
            uid: caller.uid,
            subnet: setup.subnet.to_string(),
            dns_port: setup.dns_port,
            domain: setup.domain.clone(),
            owner: setup.owner.clone(),
        });
        self.save(&records);
        Ok(())
    }

    /// The setup of `caller`'s instance `instance`; refused when it was set
    /// up for someone else or not at all.
    pub fn owned(&self, caller: &Caller, instance: &Instance) -> Result<NetSetup, Refusal> {
        let records = self.lock();
        let record = records
            .iter()
            .find(|r| r.instance == instance.id())
            .ok_or_else(|| {
                Refusal(format!(
                    "network instance {instance} is not set up (net_setup first)"
                ))
            })?;
        if record.uid != caller.uid {
            return Err(Refusal(format!(
                "network instance {instance} belongs to uid {}, not to uid {}",
                record.uid, caller.uid
            )));
        }
        record
            .setup()
            .ok_or_else(|| Refusal(format!("network instance {instance} has a bad record")))
    }

    /// Whether `instance` is set up for anyone.
    pub fn known(&self, instance: &Instance) -> bool {
        self.lock().iter().any(|r| r.instance == instance.id())
    }

    pub fn forget(&self, instance: &Instance) {
        self.forget_where(|r| r.instance == instance.id());
    }

    /// Forgets the instances `pruned` removed, and every one whose owner
    /// file says its state directory is gone: such a record would only
    /// keep its subnet from anyone else (what is left of it on the host,
    /// while a VMM still holds a tap, keeps the subnet by its routes).
    pub fn forget_orphans(&self, pruned: &[Instance]) {
        self.forget_where(|r| {
            let Ok(instance) = Instance::parse(&r.instance) else {
                return true;
            };
            pruned.contains(&instance)
                || r.owner.as_deref().is_some_and(|o| {
                    banger_host::net_orphans::owner_wants(o, &instance) == Some(false)
                })
        });
    }

    fn forget_where(&self, pred: impl Fn(&Record) -> bool) {
        let mut records = self.lock();
        let before = records.len();
        records.retain(|r| !pred(r));
        if records.len() != before {
            self.save(&records);
        }
    }

    fn save(&self, records: &[Record]) {
        let tmp = self.path.with_extension("tmp");
        let written = serde_json::to_vec_pretty(records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the helper's networks");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(id: &str, subnet: &str) -> NetSetup {
        NetSetup {
            instance: Instance::parse(id).unwrap(),
            subnet: Subnet::parse(subnet).unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
            owner: None,
        }
    }

    const ALICE: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    const BOB: Caller = Caller {
        uid: 1001,
        gid: 1001,
        pid: 1,
    };

    #[test]
    fn instances_belong_to_whoever_set_them_up_and_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("networks.json");
        let nets = Networks::load(&path);
        let a = setup("aaaaaa", "10.213.0.0/16");
        let ok = || Ok::<(), Refusal>(());
        nets.set_up(&ALICE, &a, ok).unwrap();
        // Alice may re-apply; Bob may neither take her instance nor her subnet.
        nets.set_up(&ALICE, &a, ok).unwrap();
        let err = nets.set_up(&BOB, &a, ok).unwrap_err();
        assert!(err.0.contains("uid 1000"), "{err}");
        let b = setup("bbbbbb", "10.213.128.0/24");
        assert!(nets
            .set_up(&BOB, &b, ok)
            .unwrap_err()
            .0
            .contains("overlaps"));
        // A failed apply records nothing.
        let c = setup("cccccc", "10.215.0.0/16");
        assert!(nets.set_up(&BOB, &c, || Err(Refusal("no".into()))).is_err());
        assert!(!nets.known(&c.instance));
        let b = setup("bbbbbb", "10.214.0.0/16");
        nets.set_up(&BOB, &b, ok).unwrap();
        assert_eq!(nets.owned(&BOB, &b.instance).unwrap(), b);
        assert!(nets.owned(&BOB, &a.instance).is_err());
        // Kept across a restart.
        let again = Networks::load(&path);
        assert_eq!(again.owned(&ALICE, &a.instance).unwrap(), a);
        again.forget(&a.instance);
        assert!(!Networks::load(&path).known(&a.instance));
    }
}
