//! The kill -9 campaign, short form (`make torture` runs the long one).

#[test]
fn fifty_kills_lose_nothing_and_repeat_no_committed_step() {
    let report = cairn_e2e::torture::campaign(50, 0x0dd_ba11);
    eprintln!("{report:?}");
    assert!(report.kills >= 50);
    assert_eq!((report.reran, report.lost), (0, 0), "{:#?}", report.problems);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}
