//! The handler with recording fakes for the host: what each caller may do,
//! what reaches the host, and that a refusal reaches nothing. No root needed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use banger_host::{BlockCall, FakeBlockDevices, FakeHostNetwork, NetCall};
use banger_proto::helper::{HelperReply, HelperRequest as R, HelperValue, HELPER_PROTOCOL};

use super::Helper;
use crate::policy::{Caller, Policy};

const OWNER: u32 = 1000;
const GROUP: u32 = 4242;
const MEMBER: u32 = 1001;

struct Rig {
    helper: Helper,
    net: FakeHostNetwork,
    blocks: FakeBlockDevices,
    dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_jailed(false)
}

/// A helper with a jailer and one Firecracker (`/usr/bin/true`: root's,
/// executable, in root's directories), to test what it refuses.
fn rig_with_jailer() -> Rig {
    rig_jailed(true)
}

fn rig_jailed(jailed: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("home");
    std::fs::create_dir(&allowed).unwrap();
    let policy = Policy::new(Some(OWNER), Some(GROUP), vec![allowed]).unwrap();
    let (net, blocks) = (FakeHostNetwork::default(), FakeBlockDevices::supported());
    let helper = Helper::new(
        policy,
        Arc::new(net.clone()),
        Arc::new(blocks.clone()),
        dir.path().join("state"),
        jailed.then(|| super::JailSetup {
            jailer: "/usr/bin/true".into(),
            dir: dir.path().join("jail"),
            firecrackers: vec![Path::new("/usr/bin/true").canonicalize().unwrap()],
            ids: banger_host::jail_ids::DEFAULT_JAIL_IDS,
            ids_lock: dir.path().join("ids.lock"),
        }),
    )
    .unwrap();
    Rig {
        helper,
        net,
        blocks,
        dir,
    }
}

impl Rig {
    /// What reached the host, besides the helper's own look for orphans
    /// (at start and before each setup).
    fn host_calls(&self) -> Vec<NetCall> {
        let mut calls = self.net.calls();
        calls.retain(|c| *c != NetCall::PruneOrphans);
        calls
    }
}

fn caller(uid: u32, gid: u32) -> Caller {
    Caller {
        uid,
        gid,
        pid: std::process::id(),
    }
}

fn setup(instance: &str, subnet: &str) -> R {
    R::NetSetup {
        instance: instance.into(),
        subnet: subnet.into(),
        dns_port: 1053,
        domain: "vm".into(),
        owner: None,
    }
}

fn refused(reply: HelperReply, why: &str) {
    match reply {
        HelperReply::Refused(m) => assert!(m.contains(why), "refused, but for `{m}`"),
        other => panic!("expected a refusal naming `{why}`, got {other:?}"),
    }
}

#[test]
fn ping_names_the_protocol_and_the_caller() {
    let rig = rig();
    assert_eq!(
        rig.helper.handle(&caller(OWNER, OWNER), R::Ping),
        HelperReply::Ok(HelperValue::Pong {
            protocol: HELPER_PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
            uid: OWNER,
            jails: None,
        })
    );
}

#[test]
fn an_owner_sets_up_its_network_and_taps_belong_to_whoever_asked() {
    let rig = rig();
    let owner = caller(OWNER, OWNER);
    let ok = HelperReply::Ok(HelperValue::Done);
    assert_eq!(
        rig.helper.handle(&owner, setup("aaaaaa", "10.213.0.0/16")),
        ok
    );
    assert_eq!(
        rig.helper.handle(
            &owner,
            R::TapCreate {
                tap: "bgaaaaaat0".into()
            }
        ),
        ok
    );
    let guest = Ipv4Addr::new(10, 213, 0, 2);
    assert_eq!(
        rig.helper.handle(
            &owner,
            R::Route {
                tap: "bgaaaaaat0".into(),
                guest
            }
        ),
        ok
    );
    assert_eq!(
        rig.helper.handle(
            &owner,
            R::TapList {
                instance: "aaaaaa".into()
            }
        ),
        HelperReply::Ok(HelperValue::Taps(vec!["bgaaaaaat0".into()]))
    );
    let calls = rig.host_calls();
    assert!(matches!(&calls[0], NetCall::Setup(s) if s.subnet.to_string() == "10.213.0.0/16"));
    assert_eq!(calls[1], NetCall::CreateTap("bgaaaaaat0".into(), OWNER));
    assert_eq!(calls[2], NetCall::Route("bgaaaaaat0".into(), guest));
    // Kept on disk: a restarted helper still knows whose network it is.
    let networks = std::fs::read_to_string(rig.dir.path().join("state/networks.json")).unwrap();
    assert!(networks.contains("aaaaaa"), "{networks}");
}

#[test]
fn a_group_member_touches_nothing_of_the_owners() {
    let rig = rig();
    let owner = caller(OWNER, OWNER);
    let member = caller(MEMBER, GROUP);
    rig.helper.handle(&owner, setup("aaaaaa", "10.213.0.0/16"));
    rig.helper.handle(
        &owner,
        R::TapCreate {
            tap: "bgaaaaaat0".into(),
        },
    );
    let before = rig.host_calls().len();
    for request in [
        R::TapCreate {
            tap: "bgaaaaaat1".into(),
        },
        R::TapDelete {
            tap: "bgaaaaaat0".into(),
        },
        R::TapList {
            instance: "aaaaaa".into(),
        },
        R::Route {
            tap: "bgaaaaaat0".into(),
            guest: Ipv4Addr::new(10, 213, 0, 9),
        },
        R::Unroute {
            instance: "aaaaaa".into(),
            guest: Ipv4Addr::new(10, 213, 0, 2),
        },
        R::NetTeardown {
            instance: "aaaaaa".into(),
        },
        setup("aaaaaa", "10.214.0.0/16"),
    ] {
        refused(rig.helper.handle(&member, request), "belongs to uid 1000");
    }
    // Its own instance may not overlap the owner's subnet either.
    refused(
        rig.helper.handle(&member, setup("bbbbbb", "10.213.7.0/24")),
        "overlaps",
    );
    assert_eq!(rig.host_calls().len(), before, "refusals reach no host");
    assert_eq!(
        rig.helper.handle(&member, setup("bbbbbb", "10.214.0.0/16")),
        HelperReply::Ok(HelperValue::Done)
    );
}

#[test]
fn requests_outside_the_policy_are_refused_before_the_host() {
    let rig = rig();
    let owner = caller(OWNER, OWNER);
    for (request, why) in [
        (setup("aaaaaa", "8.8.8.0/24"), "is not inside 10.0.0.0/8"),
        (setup("not-hex", "10.213.0.0/16"), "instance"),
        (
            R::NetSetup {
                instance: "aaaaaa".into(),
                subnet: "10.213.0.0/16".into(),
                dns_port: 53,
                domain: "vm".into(),
                owner: None,
            },
            "privileged",
        ),
        (
            R::NetSetup {
                instance: "aaaaaa".into(),
                subnet: "10.213.0.0/16".into(),
                dns_port: 1053,
                domain: "evil.example.com".into(),
                owner: None,
            },
            "not a DNS label",
        ),
        (
            R::NetSetup {
                instance: "aaaaaa".into(),
                subnet: "10.213.0.0/16".into(),
                dns_port: 1053,
                domain: "vm".into(),
                owner: Some("state/network.instance".into()),
            },
            "absolute path",
        ),
        (R::TapCreate { tap: "eth0".into() }, "tap"),
        (
            R::TapCreate {
                tap: "bgaaaaaat0".into(),
            },
            "not set up",
        ),
        (
            R::SnapshotTeardown {
                home: "0a1b".into(),
                vm: "../x".into(),
            },
            "not a VM name",
        ),
        (
            R::SnapshotTeardown {
                home: "../..".into(),
                vm: "web".into(),
            },
            "not a state directory id",
        ),
    ] {
        refused(rig.helper.handle(&owner, request), why);
    }
    assert!(rig.host_calls().is_empty());
    assert!(rig.blocks.calls().is_empty());
    // Tearing down an instance never set up here is a no-op, not an error.
    assert_eq!(
        rig.helper.handle(
            &owner,
            R::NetTeardown {
                instance: "cccccc".into()
            }
        ),
        HelperReply::Ok(HelperValue::Done)
    );
    assert!(rig.host_calls().is_empty());
}

fn snapshot(home: &str, vm: &str, origin: &Path, cow: &Path) -> R {
    R::SnapshotSetup {
        home: home.into(),
        vm: vm.into(),
        origin: origin.into(),
        cow: cow.into(),
    }
}

fn snapshot_files(rig: &Rig) -> (std::path::PathBuf, std::path::PathBuf) {
    let home = rig.dir.path().join("home");
    let (origin, cow) = (home.join("rootfs.ext4"), home.join("cow.img"));
    std::fs::write(&origin, b"ext4").unwrap();
    std::fs::write(&cow, b"").unwrap();
    (origin, cow)
}

#[test]
fn snapshots_take_only_the_callers_files_inside_the_allowed_dirs() {
    let rig = rig();
    // SAFETY: geteuid/getegid have no preconditions.
    let me = caller(unsafe { libc::geteuid() }, unsafe { libc::getegid() });
    let (origin, cow) = snapshot_files(&rig);
    let outside = rig.dir.path().join("elsewhere.img");
    std::fs::write(&outside, b"").unwrap();
    refused(
        rig.helper
            .handle(&me, snapshot("0a1b", "web", &outside, &cow)),
        "outside",
    );
    refused(
        rig.helper
            .handle(&me, snapshot("0a1b", "web", &origin, Path::new("cow.img"))),
        "absolute",
    );
    assert!(rig.blocks.calls().is_empty());
    let name = format!("banger-{}-0a1b-web", me.uid);
    match rig
        .helper
        .handle(&me, snapshot("0a1b", "web", &origin, &cow))
    {
        HelperReply::Ok(HelperValue::Device(dev)) => {
            assert_eq!(dev, Path::new("/dev/mapper").join(&name))
        }
        other => panic!("{other:?}"),
    }
    // Handed over by descriptor: the host sees what was checked.
    assert!(matches!(
        &rig.blocks.calls()[0],
        BlockCall::Setup { name: n, origin, .. } if *n == name && origin.starts_with("/proc/")
    ));
    // Its loops and its owner are kept in the helper's own directory.
    let state = rig.dir.path().join("state/dm");
    assert!(state.join(format!("{name}.state")).exists());
    assert_eq!(
        std::fs::read_to_string(state.join(format!("{name}.owner"))).unwrap(),
        format!("{} 0a1b web\n", me.uid)
    );
    assert_eq!(
        rig.helper.handle(
            &me,
            R::SnapshotTeardown {
                home: "0a1b".into(),
                vm: "web".into()
            }
        ),
        HelperReply::Ok(HelperValue::Done)
    );
    assert!(rig.blocks.live().is_empty());
    assert!(!state.join(format!("{name}.owner")).exists());
}

/// Two callers' VMs of one name get two devices; neither can take,
/// remove or jail the other's (red team round 3, items 2 and 3).
#[test]
fn a_snapshot_device_is_its_callers_alone() {
    let rig = rig_with_jailer();
    // SAFETY: geteuid/getegid have no preconditions.
    let me = caller(unsafe { libc::geteuid() }, unsafe { libc::getegid() });
    let other = caller(me.uid + 1, me.gid);
    let (origin, cow) = snapshot_files(&rig);
    let mine = match rig
        .helper
        .handle(&me, snapshot("0a1b", "web", &origin, &cow))
    {
        HelperReply::Ok(HelperValue::Device(dev)) => dev,
        other => panic!("{other:?}"),
    };
    // The other caller, naming the same home and VM, reaches nothing of
    // mine: its teardown touches no device, and mine lives on.
    assert_eq!(
        rig.helper.handle(
            &other,
            R::SnapshotTeardown {
                home: "0a1b".into(),
                vm: "web".into()
            }
        ),
        HelperReply::Ok(HelperValue::Done)
    );
    assert_eq!(rig.blocks.calls().len(), 1, "{:?}", rig.blocks.calls());
    assert_eq!(rig.blocks.live(), [format!("banger-{}-0a1b-web", me.uid)]);
    // Nor can it have my device made a node of its jail, by its name or
    // by the old `banger-<vm>` one.
    let launch = |vm: &str, device: &Path| {
        R::JailLaunch(banger_proto::jail::JailRequest {
            home: "0a1b".into(),
            vm: vm.into(),
            firecracker: "/usr/bin/true".into(),
            files: vec![banger_proto::jail::JailFile {
                path: device.into(),
                name: "root".into(),
                writable: true,
            }],
            console: rig.dir.path().join("home/console.log"),
            limits: Default::default(),
            tap: None,
        })
    };
    for device in [mine.as_path(), Path::new("/dev/mapper/banger-web")] {
        refused(
            rig.helper.handle(&other, launch("web", device)),
            "not a snapshot device this helper set up",
        );
    }
    // Mine, for my own VM, passes that check (and here fails the next:
    // the fake made no node).
    match rig.helper.handle(&me, launch("web", &mine)) {
        HelperReply::Refused(m) => assert!(!m.contains("set up for"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.blocks.calls().len(), 1);
}

/// The helper launches only the Firecrackers it was started with, and
/// never copies a file a caller names into a jail (red team round 3,
/// item 1: any root-owned file, /etc/shadow, went in as Firecracker).
#[test]
fn only_the_helpers_own_firecrackers_are_launched() {
    let rig = rig_with_jailer();
    let owner = caller(OWNER, OWNER);
    let launch = |fc: &str| {
        R::JailLaunch(banger_proto::jail::JailRequest {
            home: "0a1b".into(),
            vm: "web".into(),
            firecracker: fc.into(),
            files: Vec::new(),
            console: rig.dir.path().join("home/console.log"),
            limits: Default::default(),
            tap: None,
        })
    };
    for fc in [
        "/etc/shadow",
        "/etc/passwd",
        "/usr/bin/false",
        "/proc/self/exe",
    ] {
        refused(
            rig.helper.handle(&owner, launch(fc)),
            "is not a Firecracker this helper launches",
        );
    }
    // A tap is lent to the jail's uid only if it is of the caller's own
    // network: another's, or one of no network set up here, is refused.
    let with_tap = |tap: &str| {
        R::JailLaunch(banger_proto::jail::JailRequest {
            home: "0a1b".into(),
            vm: "web".into(),
            firecracker: "/usr/bin/true".into(),
            files: Vec::new(),
            console: rig.dir.path().join("home/console.log"),
            limits: Default::default(),
            tap: Some(tap.into()),
        })
    };
    assert_eq!(
        rig.helper.handle(&owner, setup("aaaaaa", "10.213.0.0/16")),
        HelperReply::Ok(HelperValue::Done)
    );
    let member = caller(MEMBER, GROUP);
    refused(
        rig.helper.handle(&member, with_tap("bgaaaaaat0")),
        "belongs to uid 1000",
    );
    refused(rig.helper.handle(&owner, with_tap("eth0")), "tap");
    refused(
        rig.helper.handle(&owner, with_tap("bgcccccct0")),
        "not set up",
    );
    // The ping lists what it launches, so a daemon can say so first.
    match rig.helper.handle(&owner, R::Ping) {
        HelperReply::Ok(HelperValue::Pong {
            jails: Some(place), ..
        }) => assert_eq!(place.firecrackers, [Path::new("/usr/bin/true")]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn jail_requests_need_a_jailer_and_checked_names() {
    let rig = rig();
    let owner = caller(OWNER, OWNER);
    let launch = |home: &str, vm: &str| {
        R::JailLaunch(banger_proto::jail::JailRequest {
            home: home.into(),
            vm: vm.into(),
            firecracker: "/usr/local/bin/firecracker".into(),
            files: Vec::new(),
            console: rig.dir.path().join("home/console.log"),
            limits: Default::default(),
            tap: None,
        })
    };
    // Without --jailer the helper launches nothing at all.
    refused(
        rig.helper.handle(&owner, launch("0a1b", "web")),
        "no jailer",
    );
    let signal = R::JailSignal {
        home: "0a1b".into(),
        vm: "web".into(),
        signal: libc::SIGKILL,
    };
    refused(rig.helper.handle(&owner, signal), "no jailer");
    // Names are checked before anything else.
    refused(
        rig.helper.handle(
            &owner,
            R::JailTeardown {
                home: "0a1b".into(),
                vm: "../etc".into(),
            },
        ),
        "DNS label",
    );
    // The ping says there is no jailer, so a daemon does not ask.
    match rig.helper.handle(&owner, R::Ping) {
        HelperReply::Ok(HelperValue::Pong { jails, .. }) => assert!(jails.is_none()),
        other => panic!("{other:?}"),
    }
}

/// An instance whose state directory is gone is removed and forgotten
/// before the next setup, whoever asks: its subnet is free again. One whose
/// owner file is there stays.
#[test]
fn orphaned_networks_are_removed_and_forgotten_before_a_setup() {
    let rig = rig();
    // Owner files are opened as the caller: the callers are whoever runs
    // the test, with two state directories of their own.
    // SAFETY: geteuid/getegid have no preconditions.
    let me = caller(unsafe { libc::geteuid() }, unsafe { libc::getegid() });
    let (alice, bob) = (me, me);
    let ok = HelperReply::Ok(HelperValue::Done);
    let homes = rig.dir.path().join("home");
    let owned_by = |id: &str, subnet: &str, file: &Path| {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, format!("{id}\n")).unwrap();
        R::NetSetup {
            instance: id.into(),
            subnet: subnet.into(),
            dns_port: 1053,
            domain: "vm".into(),
            owner: Some(file.to_path_buf()),
        }
    };
    let alice_file = homes.join("alice/state/network.instance");
    let bob_file = homes.join("bob/state/network.instance");
    assert_eq!(
        rig.helper
            .handle(&alice, owned_by("aaaaaa", "10.213.0.0/16", &alice_file)),
        ok
    );
    let recorded = |what: &str| {
        std::fs::read_to_string(rig.dir.path().join("state/networks.json"))
            .unwrap()
            .contains(what)
    };
    assert!(
        recorded(alice_file.to_str().unwrap()),
        "the owner is recorded"
    );
    refused(
        rig.helper
            .handle(&bob, owned_by("bbbbbb", "10.213.0.0/24", &bob_file)),
        "overlaps",
    );
    // Alice's state directory is thrown away: Bob gets the subnet.
    std::fs::remove_dir_all(homes.join("alice")).unwrap();
    assert_eq!(
        rig.helper
            .handle(&bob, owned_by("bbbbbb", "10.213.0.0/24", &bob_file)),
        ok
    );
    assert!(!recorded("aaaaaa") && recorded("bbbbbb"));
    // What the host says is orphaned goes too, torn down and forgotten.
    rig.net
        .set_orphan(&banger_host::Instance::parse("bbbbbb").unwrap());
    assert_eq!(
        rig.helper
            .handle(&alice, owned_by("cccccc", "10.214.0.0/16", &alice_file)),
        ok
    );
    assert!(rig.net.calls().contains(&NetCall::Teardown(
        banger_host::Instance::parse("bbbbbb").unwrap()
    )));
    assert!(!recorded("bbbbbb") && recorded("cccccc"));
    // An owner file outside the allowed directories, or holding another
    // id, is not taken: the setup works, with no owner recorded.
    let outside = tempfile::tempdir().unwrap();
    let stray = outside.path().join("network.instance");
    assert_eq!(
        rig.helper
            .handle(&bob, owned_by("dddddd", "10.215.0.0/16", &stray)),
        ok
    );
    let mut lying = owned_by("eeeeee", "10.216.0.0/16", &bob_file);
    if let R::NetSetup { instance, .. } = &mut lying {
        *instance = "abcdef".into();
    }
    assert_eq!(rig.helper.handle(&bob, lying), ok);
    let owners: Vec<_> = rig
        .net
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            NetCall::Setup(s) if ["dddddd", "abcdef"].contains(&s.instance.id()) => Some(s.owner),
            _ => None,
        })
        .collect();
    assert_eq!(owners, [None, None]);
}
