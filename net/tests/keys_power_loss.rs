//! Power loss while API keys are made and revoked, on the simulated disk of
//! `tally_net::keys::sim`.
//!
//! Each case runs a seeded workload (the first start, with the operator's key or a generated
//! one, then creates and revokes of gateway and admin keys), cuts the power after a seeded number
//! of storage operations (or not at all), and restarts on what the disk kept: only synced data
//! and names, or, in every other case, a seeded share of the unsynced writes too. Then the
//! store opens; every key whose `create` (or first start) returned Ok authenticates, as itself,
//! unless its `revoke` returned Ok; a key whose `revoke` returned Ok does not (a key whose
//! `revoke` the power loss interrupted may be either: the file may be written and renamed
//! before the call could return); a generated
//! initial admin key that was handed out is in `admin.key`; and the store takes changes again.
//!
//! `TALLY_POWER_LOSS_CASES` sets the number of cases (default 200).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use tally_net::keys::{
    sim::SimStorage, storage::Storage, Bootstrap, KeyError, KeyStore, ADMIN_KEY_FILE,
};
use tally_net::Scope;

const DATA: &str = "/data";
const OPERATOR_KEY: &str = "operator-chosen-admin-key";

fn cases() -> u64 {
    std::env::var("TALLY_POWER_LOSS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// splitmix64: the test's only source of choices, seeded per case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A disk whose data directory exists durably, as the server's does.
fn disk() -> SimStorage {
    let sim = SimStorage::new();
    sim.create_dir(Path::new(DATA)).unwrap();
    sim.sync_dir(Path::new("/")).unwrap();
    sim
}

/// What the workload was told before the power went.
#[derive(Default)]
struct Outcome {
    /// Keys whose creation returned Ok: id → secret.
    created: BTreeMap<u64, String>,
    /// Keys whose revocation returned Ok.
    revoked: BTreeSet<u64>,
    /// The key whose revocation the power loss interrupted: revoked or not, both are right.
    revoke_in_doubt: Option<u64>,
    /// The generated initial admin key, if the first start returned one.
    generated: Option<String>,
    /// Where the power loss interrupted it.
    interrupted: Option<&'static str>,
}

/// The seeded workload. Stops at the first storage error, which must be the power loss.
fn workload(sim: &SimStorage, seed: u64) -> Outcome {
    let mut rng = Rng(seed);
    let mut out = Outcome::default();
    let stop = |out: &mut Outcome, call: &'static str, error: KeyError| {
        assert!(
            sim.crashed(),
            "seed {seed}: {call} failed without a crash: {error}"
        );
        assert!(
            matches!(error, KeyError::Storage(_)),
            "seed {seed}: {call}: {error}"
        );
        out.interrupted = Some(call);
    };
    let operator = (rng.below(2) == 0).then_some(OPERATOR_KEY);
    let store = match KeyStore::open_in(sim.clone(), Path::new(DATA), operator) {
        Ok((store, bootstrap)) => {
            let secret = match bootstrap {
                Bootstrap::FromOperator => OPERATOR_KEY.to_string(),
                Bootstrap::Generated { key, .. } => {
                    out.generated = Some(key.clone());
                    key
                }
                Bootstrap::Existing => panic!("seed {seed}: a key file on a new disk"),
            };
            out.created.insert(1, secret);
            store
        }
        Err(e) => {
            stop(&mut out, "open", e);
            return out;
        }
    };
    for _ in 0..8 {
        let live: Vec<u64> = out
            .created
            .keys()
            .filter(|id| !out.revoked.contains(id))
            .copied()
            .collect();
        if live.len() > 1 && rng.below(3) == 0 {
            let id = live[rng.below(live.len() as u64) as usize];
            match store.revoke(id) {
                Ok(()) => {
                    out.revoked.insert(id);
                }
                Err(KeyError::LastAdmin(_)) => {}
                Err(e) => {
                    stop(&mut out, "revoke", e);
                    out.revoke_in_doubt = Some(id);
                    return out;
                }
            }
        } else {
            let scope = if rng.below(3) == 0 {
                Scope::Admin
            } else {
                Scope::Gateway
            };
            match store.create("k", scope) {
                Ok((id, secret)) => {
                    assert!(out.created.insert(id, secret).is_none(), "seed {seed}");
                }
                Err(e) => {
                    stop(&mut out, "create", e);
                    return out;
                }
            }
        }
    }
    out
}

/// The restart on the disk the power loss left, checked against what the workload was told.
fn check(after: &SimStorage, out: &Outcome, seed: u64) {
    let (store, _) = KeyStore::open_in(after.clone(), Path::new(DATA), Some(OPERATOR_KEY))
        .unwrap_or_else(|e| panic!("seed {seed}: the key store does not open: {e}"));
    for (id, secret) in &out.created {
        let live = store.authenticate(secret.as_bytes());
        if out.revoke_in_doubt == Some(*id) {
            continue;
        }
        if out.revoked.contains(id) {
            assert!(
                live.is_none(),
                "seed {seed}: key {id} authenticates after its revoke returned Ok"
            );
        } else {
            let live = live.unwrap_or_else(|| {
                panic!("seed {seed}: key {id} was created (Ok) but does not authenticate")
            });
            assert_eq!(live.id, *id, "seed {seed}");
        }
    }
    if let Some(key) = &out.generated {
        let file = after
            .read(&Path::new(DATA).join(ADMIN_KEY_FILE))
            .unwrap_or_else(|e| panic!("seed {seed}: the generated admin key is lost: {e}"));
        assert_eq!(file, format!("{key}\n").as_bytes(), "seed {seed}");
    }
    // The store takes changes again, and its ids are not reused.
    let (id, secret) = store.create("after", Scope::Gateway).unwrap();
    assert!(
        !out.created.contains_key(&id),
        "seed {seed}: id {id} reused"
    );
    assert_eq!(store.authenticate(secret.as_bytes()).unwrap().id, id);
}

#[test]
fn created_and_revoked_keys_survive_power_loss_at_every_point() {
    let cases = cases();
    let mut interrupted: BTreeMap<&str, u64> = BTreeMap::new();
    for case in 0..cases {
        let seed = 0x6b65_0000 + case;
        // A dry run counts the workload's operations (the same choices: the secrets differ,
        // the calls do not); the crash lands anywhere among them, or after the last.
        let dry = disk();
        let before = dry.ops();
        workload(&dry, seed);
        let ops = dry.ops() - before;

        let sim = disk();
        let mut rng = Rng(seed ^ 0xc0ff_ee00);
        sim.crash_after(rng.below(ops + 1));
        let out = workload(&sim, seed);
        *interrupted
            .entry(out.interrupted.unwrap_or("no crash"))
            .or_default() += 1;

        // Even cases keep only synced data and names; odd ones some unsynced writes too.
        let after = if case % 2 == 0 {
            sim.power_loss()
        } else {
            sim.power_loss_with(|n| rng.below(n as u64 + 1) as usize)
        };
        check(&after, &out, seed);
    }
    eprintln!("{cases} cases, interrupted in: {interrupted:#?}");
    if cases >= 200 {
        for point in ["open", "create", "revoke", "no crash"] {
            assert!(
                interrupted.contains_key(point),
                "never interrupted in {point}"
            );
        }
    }
}
