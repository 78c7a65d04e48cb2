//! Every dispatched method is documented in docs/rpc.md, and every documented
//! method is dispatched.

use std::sync::Arc;

use banger_core::events::Events;
use banger_core::ops::Core;
use banger_core::paths::Paths;
use banger_proto::rpc::ALL;
use banger_proto::ErrorCode;

fn documented() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/rpc.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.strip_suffix('`'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn docs_and_dispatch_agree() {
    let mut docs = documented();
    docs.sort();
    let mut methods: Vec<String> = ALL.iter().map(|m| m.to_string()).collect();
    methods.sort();
    assert_eq!(
        docs, methods,
        "docs/rpc.md and banger_proto::rpc::ALL disagree"
    );
}

#[tokio::test]
async fn every_listed_method_is_dispatched() {
    let tmp = tempfile::tempdir().unwrap();
    let core = Core::open(
        Paths::under(tmp.path()),
        Arc::new(banger_host::FakeRunner::default()),
        Default::default(),
    )
    .unwrap();
    for method in ALL {
        // Invalid params are fine here; an unknown method is not.
        if let Err(e) = core
            .dispatch(
                method,
                serde_json::json!({"names": [], "reference": "x/"}),
                Events::none(),
            )
            .await
        {
            assert_ne!(
                e.code,
                ErrorCode::BadRequest,
                "{method} is not dispatched: {}",
                e.message
            );
        }
    }
    let err = core
        .dispatch("no.such", serde_json::Value::Null, Events::none())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
}
