//! `Engine::list_wallets`: pagination in creation order, filters, and the bounded scan.

mod common;

use common::*;
use tally_engine::*;

/// Creates a wallet with metadata (no plan), directly.
fn wallet_with(h: &mut Harness, id: &str, metadata: &[(&str, &str)]) -> WalletId {
    let wallet = n(id);
    h.ok(Command::CreateWallet(CreateWallet {
        wallet,
        overdraft: vec![],
        metadata: metadata.iter().map(|(k, v)| (n(k), n(v))).collect(),
    }));
    wallet
}

fn ids(page: &WalletPage) -> Vec<WalletId> {
    page.wallets.iter().map(|w| w.wallet).collect()
}

/// Follows `next` to the end, checking each page's size; returns every wallet listed.
fn list_all(h: &Harness, limit: usize, filter: &WalletFilter) -> (Vec<WalletId>, usize) {
    let mut listed = Vec::new();
    let mut from = 0;
    let mut calls = 0;
    loop {
        let page = h.engine.list_wallets(from, limit, filter);
        calls += 1;
        assert!(page.wallets.len() <= limit.clamp(1, WALLET_PAGE_MAX));
        listed.extend(ids(&page));
        match page.next {
            Some(next) => {
                assert!(next > from, "next {next} does not move past {from}");
                from = next;
            }
            None => return (listed, calls),
        }
    }
}

#[test]
fn list_wallets_pages_return_every_wallet_once_in_creation_order() {
    let mut h = Harness::new();
    let created: Vec<WalletId> = (0..23).map(|i| h.wallet(&format!("w{i:02}"))).collect();

    let (listed, calls) = list_all(&h, 5, &WalletFilter::default());
    assert_eq!(listed, created);
    assert_eq!(calls, 5);

    // Pages are exactly `limit` long until the last; `next` is the position to go on from.
    let first = h.engine.list_wallets(0, 5, &WalletFilter::default());
    assert_eq!(ids(&first), created[..5]);
    assert_eq!(first.next, Some(5));
    let last = h.engine.list_wallets(20, 5, &WalletFilter::default());
    assert_eq!(ids(&last), created[20..]);
    assert_eq!(last.next, None);

    // A page that ends exactly on the last wallet has no next.
    let exact = h.engine.list_wallets(18, 5, &WalletFilter::default());
    assert_eq!(ids(&exact), created[18..]);
    assert_eq!(exact.next, None);

    // Each listed wallet is the same view `Query::Wallet` gives.
    for view in &first.wallets {
        assert_eq!(*view, h.view(view.wallet));
    }

    // Limit 0 counts as 1; a limit above the page maximum is cut to it.
    let one = h.engine.list_wallets(0, 0, &WalletFilter::default());
    assert_eq!(ids(&one), created[..1]);
    assert_eq!(one.next, Some(1));
    let all = h
        .engine
        .list_wallets(0, usize::MAX, &WalletFilter::default());
    assert_eq!(ids(&all), created);
    assert_eq!(all.next, None);

    // Past the end: an empty last page.
    for from in [23, 24, u32::MAX] {
        let page = h.engine.list_wallets(from, 5, &WalletFilter::default());
        assert_eq!(page.wallets, vec![]);
        assert_eq!(page.next, None);
    }
}

#[test]
fn list_wallets_of_an_empty_shard_is_one_empty_page() {
    let h = Harness::new();
    let page = h.engine.list_wallets(0, 10, &WalletFilter::default());
    assert_eq!(
        page,
        WalletPage {
            wallets: vec![],
            next: None
        }
    );
}

#[test]
fn list_wallets_page_max_caps_a_page() {
    let mut h = Harness::new();
    let created: Vec<WalletId> = (0..WALLET_PAGE_MAX + 10)
        .map(|i| wallet_with(&mut h, &format!("w{i}"), &[]))
        .collect();
    let page = h.engine.list_wallets(0, 5000, &WalletFilter::default());
    assert_eq!(ids(&page), created[..WALLET_PAGE_MAX]);
    assert_eq!(page.next, Some(WALLET_PAGE_MAX as u32));
    let rest = h
        .engine
        .list_wallets(WALLET_PAGE_MAX as u32, 5000, &WalletFilter::default());
    assert_eq!(ids(&rest), created[WALLET_PAGE_MAX..]);
    assert_eq!(rest.next, None);
}

#[test]
fn list_wallets_filters_by_frozen() {
    let mut h = Harness::new();
    let created: Vec<WalletId> = (0..10).map(|i| h.wallet(&format!("w{i}"))).collect();
    for w in [created[1], created[4], created[9]] {
        h.ok(Command::Freeze { wallet: w });
    }
    let frozen = WalletFilter {
        frozen: Some(true),
        ..WalletFilter::default()
    };
    let (listed, _) = list_all(&h, 2, &frozen);
    assert_eq!(listed, vec![created[1], created[4], created[9]]);
    assert!(h
        .engine
        .list_wallets(0, 10, &frozen)
        .wallets
        .iter()
        .all(|w| w.frozen));

    let thawed = WalletFilter {
        frozen: Some(false),
        ..WalletFilter::default()
    };
    let (listed, _) = list_all(&h, 3, &thawed);
    let expected: Vec<WalletId> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| ![1, 4, 9].contains(i))
        .map(|(_, w)| *w)
        .collect();
    assert_eq!(listed, expected);
}

#[test]
fn list_wallets_filters_by_debt() {
    let mut h = Harness::new();
    let created: Vec<WalletId> = (0..8).map(|i| h.wallet(&format!("w{i}"))).collect();
    // w2 and w5 spend more than they have; w3 has a grant but no debt; w6 paid its debt back.
    for w in [created[2], created[5], created[6]] {
        h.usage(w, "1000", "0", DebitMode::Record);
    }
    h.grant(created[3], "10");
    h.grant(created[6], "5");
    assert!(h.balance(created[2]).debt > d("0"));
    assert_eq!(h.balance(created[6]).debt, d("0"));

    let in_debt = WalletFilter {
        in_debt: Some(true),
        ..WalletFilter::default()
    };
    let (listed, _) = list_all(&h, 10, &in_debt);
    assert_eq!(listed, vec![created[2], created[5]]);

    let clear = WalletFilter {
        in_debt: Some(false),
        ..WalletFilter::default()
    };
    let (listed, _) = list_all(&h, 10, &clear);
    let expected: Vec<WalletId> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| ![2, 5].contains(i))
        .map(|(_, w)| *w)
        .collect();
    assert_eq!(listed, expected);

    // Conditions combine: frozen and in debt.
    h.ok(Command::Freeze { wallet: created[5] });
    h.ok(Command::Freeze { wallet: created[7] });
    let both = WalletFilter {
        frozen: Some(true),
        in_debt: Some(true),
        ..WalletFilter::default()
    };
    let (listed, _) = list_all(&h, 10, &both);
    assert_eq!(listed, vec![created[5]]);
}

#[test]
fn list_wallets_filters_by_metadata_pairs() {
    let mut h = Harness::new();
    let a = wallet_with(&mut h, "a", &[("tier", "gold"), ("region", "eu")]);
    let b = wallet_with(&mut h, "b", &[("tier", "gold"), ("region", "us")]);
    let _c = wallet_with(&mut h, "c", &[("tier", "silver"), ("region", "eu")]);
    let _d = wallet_with(&mut h, "d", &[]);
    let metadata = |pairs: &[(&str, &str)]| WalletFilter {
        metadata: pairs.iter().map(|(k, v)| (n(k), n(v))).collect(),
        ..WalletFilter::default()
    };

    assert_eq!(
        list_all(&h, 10, &metadata(&[("tier", "gold")])).0,
        vec![a, b]
    );
    assert_eq!(
        list_all(&h, 10, &metadata(&[("tier", "gold"), ("region", "eu")])).0,
        vec![a]
    );
    // The order of the pairs and repeats do not matter.
    assert_eq!(
        list_all(
            &h,
            10,
            &metadata(&[("region", "us"), ("tier", "gold"), ("region", "us")])
        )
        .0,
        vec![b]
    );
    // A key must have the value asked for; an unknown key matches nothing.
    assert_eq!(list_all(&h, 10, &metadata(&[("tier", "bronze")])).0, vec![]);
    assert_eq!(list_all(&h, 10, &metadata(&[("plan", "gold")])).0, vec![]);
    // Two values for one key cannot both hold.
    assert_eq!(
        list_all(&h, 10, &metadata(&[("tier", "gold"), ("tier", "silver")])).0,
        vec![]
    );
    // More distinct pairs than a wallet can hold match nothing, and the page still moves on.
    let many: Vec<(String, String)> = (0..=METADATA_MAX)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let page = h.engine.list_wallets(0, 10, &metadata(&many));
    assert_eq!(page.wallets, vec![]);
    assert_eq!(page.next, None);
}

#[test]
fn list_wallets_looks_at_no_more_than_the_scan_budget() {
    let mut h = Harness::new();
    let count = 5000;
    let mut last = None;
    for i in 0..count {
        let metadata: &[(&str, &str)] = if i == count - 1 {
            &[("needle", "yes")]
        } else {
            &[]
        };
        last = Some(wallet_with(&mut h, &format!("w{i}"), metadata));
    }
    let needle = WalletFilter {
        metadata: vec![(n("needle"), n("yes"))],
        ..WalletFilter::default()
    };

    let first = h.engine.list_wallets(0, 10, &needle);
    assert_eq!(first.wallets, vec![]);
    assert_eq!(first.next, Some(WALLET_SCAN_MAX as u32));
    let second = h.engine.list_wallets(first.next.unwrap(), 10, &needle);
    assert_eq!(ids(&second), vec![last.unwrap()]);
    assert_eq!(second.next, None);

    // From any position, one call moves at most the scan budget on.
    let page = h.engine.list_wallets(100, 10, &needle);
    assert_eq!(page.wallets, vec![]);
    assert_eq!(page.next, Some(100 + WALLET_SCAN_MAX as u32));

    // Without a filter, the page limit stops the scan first.
    let (listed, calls) = list_all(&h, WALLET_PAGE_MAX, &WalletFilter::default());
    assert_eq!(listed.len(), count);
    assert_eq!(calls, count.div_ceil(WALLET_PAGE_MAX));
}
