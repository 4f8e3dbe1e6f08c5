//! The PostgreSQL schema: numbered migrations mirroring SQLite's, and the
//! checks that a database is Cairn's, of a version this build knows.

use tokio_postgres::Client;

use super::{gate, pg_error};
use crate::store::StoreError;

/// `application_id` in `cairn_meta`: the same mark as SQLite's ("CRN1").
pub const APPLICATION_ID: &str = "CRN1";

/// Numbered migrations; `schema_version` in `cairn_meta` is how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite schema has after its migration 8, at once.
    r#"
    CREATE TABLE cairn_seq (one INT PRIMARY KEY CHECK (one = 1), next BIGINT NOT NULL);
    INSERT INTO cairn_seq VALUES (1, 1);
    CREATE TABLE modules (hash TEXT PRIMARY KEY, bytes BYTEA NOT NULL, created_at BIGINT NOT NULL);
    CREATE TABLE runs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        module TEXT NOT NULL REFERENCES modules(hash),
        module_path TEXT NOT NULL,
        input BYTEA NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL,
        output BYTEA,
        error TEXT,
        created_at BIGINT NOT NULL,
        finished_at BIGINT,
        cancel_requested BOOLEAN NOT NULL DEFAULT false,
        random_key BYTEA,
        cancel_grace_until BIGINT,
        -- The lease: who executes the run, the takeover count, until when.
        owner TEXT,
        epoch BIGINT NOT NULL DEFAULT 0,
        lease_until TIMESTAMPTZ
    );
    CREATE INDEX runs_unfinished ON runs(seq) WHERE status NOT IN ('completed', 'failed', 'cancelled');
    CREATE TABLE history (
        id BIGINT PRIMARY KEY,
        run BIGINT NOT NULL REFERENCES runs(seq),
        position INT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        occurrence INT NOT NULL,
        attempt INT NOT NULL,
        status TEXT NOT NULL,
        output BYTEA NOT NULL,
        error TEXT,
        started_at BIGINT NOT NULL,
        finished_at BIGINT NOT NULL,
        -- The lease epoch that wrote it: one epoch at a time per run.
        epoch BIGINT NOT NULL,
        committed_us BIGINT NOT NULL,
        UNIQUE (run, position)
    );
    CREATE TABLE signals (
        seq BIGSERIAL PRIMARY KEY,
        run BIGINT NOT NULL REFERENCES runs(seq),
        name TEXT NOT NULL,
        payload BYTEA NOT NULL,
        sent_at BIGINT NOT NULL,
        consumed_at BIGINT
    );
    CREATE INDEX signals_pending ON signals(run, name, seq) WHERE consumed_at IS NULL;
    CREATE TABLE branches (
        run BIGINT NOT NULL REFERENCES runs(seq),
        name TEXT NOT NULL,
        occurrence INT NOT NULL,
        attempt INT NOT NULL,
        status TEXT NOT NULL,
        output BYTEA NOT NULL,
        error TEXT,
        started_at BIGINT NOT NULL,
        finished_at BIGINT NOT NULL,
        PRIMARY KEY (run, name, occurrence, attempt)
    );
    CREATE TABLE changes (
        seq BIGINT PRIMARY KEY,
        run BIGINT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT,
        committed_us BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        hash BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BYTEA,
        version BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE TABLE kv_namespaces (namespace TEXT PRIMARY KEY, keys BIGINT NOT NULL);
    "#,
    // 2: the fence as one server-side check, and the common batch's
    // writes to `runs` with it, so that a whole batch can be sent as one
    // statement and fail with it.
    r#"
    -- Fails with CN001 unless each run still has the epoch its writer holds
    -- (DETAIL "run held now"; now -1: no such run). No row lock: the caller
    -- holds the row lock of cairn_seq, which every takeover takes too (FOR
    -- SHARE) before it commits, and each statement of a VOLATILE function
    -- sees what was committed when it starts (not when the calling statement
    -- did); so a takeover commits either before this check (which sees it)
    -- or after the writer's commit.
    CREATE FUNCTION cairn_fence(fenced_runs BIGINT[], held_epochs BIGINT[]) RETURNS VOID
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        lost RECORD;
    BEGIN
        SELECT f.run, f.epoch AS held, r.epoch AS now INTO lost
          FROM unnest(fenced_runs, held_epochs) AS f(run, epoch) LEFT JOIN runs r ON r.seq = f.run
         WHERE r.epoch IS DISTINCT FROM f.epoch LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'the lease of run % was taken over by another process', lost.run
                USING ERRCODE = 'CN001', DETAIL = format('%s %s %s', lost.run, lost.held, coalesce(lost.now, -1));
        END IF;
    END $$;
    -- The common batch's numbers, fence and status changes, in this order:
    -- the row of cairn_seq first, then runs in key order, as every writer
    -- takes its locks, so that no two writers, or a writer and a heartbeat
    -- or a takeover, wait in a circle. Returns the first number.
    CREATE FUNCTION cairn_commit_batch(n BIGINT, fenced_runs BIGINT[], held_epochs BIGINT[],
                                       status_runs BIGINT[], statuses TEXT[], outputs BYTEA[], errors TEXT[],
                                       finished BIGINT[]) RETURNS BIGINT
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        first BIGINT;
        locked BIGINT[];
    BEGIN
        UPDATE cairn_seq SET next = next + n RETURNING next - n INTO first;
        PERFORM cairn_fence(fenced_runs, held_epochs);
        IF cardinality(status_runs) > 0 THEN
            SELECT array_agg(l.seq) INTO locked
              FROM (SELECT r.seq FROM runs r WHERE r.seq = ANY(status_runs) ORDER BY r.seq FOR NO KEY UPDATE) l;
            UPDATE runs SET status = u.status, output = u.output, error = u.error, finished_at = u.finished
              FROM unnest(status_runs, statuses, outputs, errors, finished) AS u(run, status, output, error, finished)
             WHERE runs.seq = u.run;
        END IF;
        RETURN first;
    END $$;
    -- Every history row is written under its run's fence, which finds the
    -- run; a foreign key would check it again, with a row lock, per row.
    ALTER TABLE history DROP CONSTRAINT history_run_fkey;
    "#,
    // 3: the gate's generation, which every take moves on, so that a commit
    // can tell under the row lock of cairn_seq that no run changed hands
    // since it last saw its runs' epochs, and skip the fence; the common
    // batch returns it.
    r#"
    ALTER TABLE cairn_seq ADD COLUMN gen BIGINT NOT NULL DEFAULT 0;
    -- (IF EXISTS: an early build's migration 2 named it cairn_take_seq.)
    DROP FUNCTION IF EXISTS cairn_commit_batch(BIGINT, BIGINT[], BIGINT[], BIGINT[], TEXT[], BYTEA[], TEXT[], BIGINT[]);
    -- As in migration 2; returns the first number and the generation (under
    -- the row lock: no take commits between the fence and the commit).
    CREATE FUNCTION cairn_commit_batch(n BIGINT, fenced_runs BIGINT[], held_epochs BIGINT[],
                                       status_runs BIGINT[], statuses TEXT[], outputs BYTEA[], errors TEXT[],
                                       finished BIGINT[], OUT first BIGINT, OUT generation BIGINT)
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        locked BIGINT[];
    BEGIN
        UPDATE cairn_seq SET next = next + n RETURNING next - n, gen INTO first, generation;
        PERFORM cairn_fence(fenced_runs, held_epochs);
        IF cardinality(status_runs) > 0 THEN
            SELECT array_agg(l.seq) INTO locked
              FROM (SELECT r.seq FROM runs r WHERE r.seq = ANY(status_runs) ORDER BY r.seq FOR NO KEY UPDATE) l;
            UPDATE runs SET status = u.status, output = u.output, error = u.error, finished_at = u.finished
              FROM unnest(status_runs, statuses, outputs, errors, finished) AS u(run, status, output, error, finished)
             WHERE runs.seq = u.run;
        END IF;
    END $$;
    "#,
    // 4: runs given back while they sleep or wait for a signal: claims find
    // them by their wake-up time or their signal, and the runs to claim now
    // without them.
    r#"
    ALTER TABLE runs ADD COLUMN wake_at BIGINT;
    ALTER TABLE runs ADD COLUMN waiting_for TEXT;
    CREATE INDEX runs_wake ON runs(wake_at)
        WHERE wake_at IS NOT NULL AND status NOT IN ('completed', 'failed', 'cancelled');
    CREATE INDEX runs_claimable ON runs(seq)
        WHERE wake_at IS NULL AND status NOT IN ('completed', 'failed', 'cancelled');
    "#,
    // 5: the gate as an advisory lock and two sequences (`gate`), instead
    // of the row of cairn_seq that every commit locked and rewrote. The row
    // goes, locked first so that no process of an older build still running
    // takes a number between the copy and the drop; such a process can then
    // neither take runs nor number commits by the row, and its fenced
    // batches call the function below, which takes the gate.
    concat!(
        r#"
    LOCK TABLE cairn_seq IN ACCESS EXCLUSIVE MODE;
    CREATE SEQUENCE cairn_ids MINVALUE 0;
    SELECT setval('cairn_ids', (SELECT next - 1 FROM cairn_seq), true);
    CREATE SEQUENCE cairn_gen MINVALUE 0;
    SELECT setval('cairn_gen', (SELECT gen FROM cairn_seq), true);
    -- As in migration 3, the numbers and the generation read under the gate,
    -- and the fence checked after it, in a statement of its own (a fresh
    -- snapshot: every take committed before the lock is seen).
    CREATE OR REPLACE FUNCTION cairn_commit_batch(n BIGINT, fenced_runs BIGINT[], held_epochs BIGINT[],
                                       status_runs BIGINT[], statuses TEXT[], outputs BYTEA[], errors TEXT[],
                                       finished BIGINT[], OUT first BIGINT, OUT generation BIGINT)
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        locked BIGINT[];
    BEGIN
        PERFORM pg_advisory_xact_lock("#,
        gate::gate_key!(),
        r#");
        first := setval('cairn_ids', pg_sequence_last_value('cairn_ids') + n) - n + 1;
        generation := pg_sequence_last_value('cairn_gen');
        PERFORM cairn_fence(fenced_runs, held_epochs);
        IF cardinality(status_runs) > 0 THEN
            SELECT array_agg(l.seq) INTO locked
              FROM (SELECT r.seq FROM runs r WHERE r.seq = ANY(status_runs) ORDER BY r.seq FOR NO KEY UPDATE) l;
            UPDATE runs SET status = u.status, output = u.output, error = u.error, finished_at = u.finished
              FROM unnest(status_runs, statuses, outputs, errors, finished) AS u(run, status, output, error, finished)
             WHERE runs.seq = u.run;
        END IF;
    END $$;
    DROP TABLE cairn_seq;
    "#
    ),
];

/// Check that the database is Cairn's (or empty) and bring its schema up to
/// date, one process at a time (an advisory lock for the transaction).
pub(super) async fn migrate(client: &mut Client, location: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock(1129465393)", &[]).await.map_err(pg_error)?;
    let has_meta: bool =
        tx.query_one("SELECT to_regclass('cairn_meta') IS NOT NULL", &[]).await.map_err(pg_error)?.get(0);
    let version: i64 = if has_meta {
        let rows = tx.query("SELECT key, value FROM cairn_meta", &[]).await.map_err(pg_error)?;
        let get = |k: &str| rows.iter().find(|r| r.get::<_, String>(0) == k).map(|r| r.get::<_, String>(1));
        if get("application_id").as_deref() != Some(APPLICATION_ID) {
            return Err(StoreError::NotCairn {
                location: location.into(),
                why: "its cairn_meta table is not Cairn's".into(),
            });
        }
        get("schema_version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::NotCairn { location: location.into(), why: "it has no schema version".into() })?
    } else {
        let tables: i64 = tx
            .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if tables != 0 {
            return Err(StoreError::NotCairn {
                location: location.into(),
                why: "its schema has tables of another program".into(),
            });
        }
        0
    };
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { location: location.into(), found: version, known });
    }
    if version == known {
        return tx.commit().await.map_err(pg_error);
    }
    if version == 0 {
        let mut id = [0u8; 16];
        let mut key = [0u8; 32];
        getrandom::fill(&mut id)
            .and_then(|()| getrandom::fill(&mut key))
            .map_err(|e| StoreError::Corrupt(format!("no randomness: {e}")))?;
        tx.batch_execute("CREATE TABLE cairn_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .await
            .map_err(pg_error)?;
        for (k, v) in [
            ("application_id", APPLICATION_ID.to_string()),
            ("db_id", hex::encode(id)),
            ("cache_key", hex::encode(key)),
            ("created_at", crate::model::now_ms().to_string()),
            ("schema_version", "0".to_string()),
        ] {
            tx.execute("INSERT INTO cairn_meta (key, value) VALUES ($1, $2)", &[&k, &v]).await.map_err(pg_error)?;
        }
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.batch_execute(sql).await.map_err(pg_error)?;
    }
    tx.execute("UPDATE cairn_meta SET value = $1 WHERE key = 'schema_version'", &[&known.to_string()])
        .await
        .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)
}
