//! The PostgreSQL store's tests: the conformance suite, on a fresh
//! database per test in the server named by `CAIRN_TEST_PG` (`make test`
//! starts a throwaway cluster and sets it, with `CAIRN_REQUIRE_PG=1` so
//! that the suite cannot be skipped there).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::PostgresStore;
use crate::store::conformance::Opening;
use crate::store::{Durability, RunStore};

/// Whether a PostgreSQL server is configured; without one (a plain `cargo
/// test`) the suite says so and passes over, unless `CAIRN_REQUIRE_PG` is set.
fn available() -> bool {
    if std::env::var_os("CAIRN_TEST_PG").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CAIRN_REQUIRE_PG").is_none(),
        "CAIRN_REQUIRE_PG is set but CAIRN_TEST_PG is not: no PostgreSQL server for the suite"
    );
    eprintln!("skipped: no PostgreSQL server (set CAIRN_TEST_PG=postgres://...; `make test` starts one)");
    false
}

/// The admin URL with another database name.
fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("CAIRN_TEST_PG is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

fn open(name: &str) -> Opening {
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("cairn_t_{}_{}_{}", name.replace('-', "_"), std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    Box::pin(async move {
        let admin = std::env::var("CAIRN_TEST_PG").expect("CAIRN_TEST_PG");
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).await.expect("drop");
        client.batch_execute(&format!("CREATE DATABASE {db}")).await.expect("create");
        let store = PostgresStore::connect(&with_database(&admin, &db), Durability::Process, Duration::from_secs(5))
            .await
            .expect("open");
        Arc::new(store) as Arc<dyn RunStore>
    })
}

/// A second store on the same database: another process, as far as leases
/// and the change feed can tell.
fn reopen(store: &Arc<dyn RunStore>) -> Opening {
    let url = store.location().to_string();
    Box::pin(async move {
        Arc::new(PostgresStore::connect(&url, Durability::Process, Duration::from_secs(5)).await.expect("reopen"))
            as Arc<dyn RunStore>
    })
}

crate::store::conformance::suite!(open, reopen, super::available);
