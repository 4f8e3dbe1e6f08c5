//! Employee onboarding: create the account; then provision a laptop and
//! grant access at the same time (two parallel branches); then send the
//! welcome emails (one `send_email` step per email: the same step name in a
//! loop gets occurrences 1, 2, 3, each with its own idempotency key).
//!
//! Each "service" call takes `simulate_ms` (default 0). With a directory
//! granted as `/out`, every side effect appends a line to
//! `/out/effects.log`, so you can count how often each one happened.
//!
//! ```sh
//! cairn run target/wasm32-wasip1/release/onboarding.wasm --dir out::/out \
//!   --input '{"name":"Ada Lovelace","email":"ada@example.com","team":"engines","simulate_ms":1500}'
//! ```

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Ctx, Error, Step};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Employee {
    name: String,
    email: String,
    team: String,
    /// Simulated latency of each service call, in milliseconds.
    #[serde(default)]
    simulate_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Account {
    user_id: String,
}

#[derive(Serialize)]
struct Onboarded {
    user_id: String,
    laptop: String,
    groups: Vec<String>,
    emails_sent: Vec<String>,
}

fn main() {
    cairn_sdk::run(workflow)
}

/// Call a (simulated) service: wait, record the side effect, say so.
fn service(emp: &Employee, s: &Step, what: &str) -> Result<(), Error> {
    std::thread::sleep(Duration::from_millis(emp.simulate_ms));
    if std::fs::metadata("/out").is_ok() {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open("/out/effects.log")?;
        log.write_all(format!("{} {} {what}\n", s.name(), s.idempotency_key()).as_bytes())?;
    }
    eprintln!("  [{}] {what}", s.name());
    Ok(())
}

fn workflow(ctx: &mut Ctx, emp: Employee) -> Result<Onboarded, Error> {
    let account: Account = ctx.step("create_account", |s| {
        service(&emp, s, &format!("created an account for {}", emp.name))?;
        Ok(Account { user_id: format!("u_{}", &s.idempotency_key()[..8]) })
    })?;

    // Independent of each other: run them side by side.
    let laptop = ctx.spawn("provision_laptop", |s| {
        service(&emp, s, &format!("provisioned a laptop for {}", account.user_id))?;
        Ok(format!("LT-{}", &s.idempotency_key()[..6].to_uppercase()))
    })?;
    let access = ctx.spawn("grant_access", |s| {
        let groups = vec!["everyone".to_string(), emp.team.clone()];
        service(&emp, s, &format!("granted {groups:?} to {}", account.user_id))?;
        Ok(groups)
    })?;
    let (laptop, groups): (String, Vec<String>) = ctx.join2(laptop, access)?;

    let mut emails_sent = Vec::new();
    for subject in ["Welcome aboard", "Your laptop is ready", "Meet your team"] {
        // The mail service deduplicates by the key: a resent email is not sent twice.
        let id: String = ctx.step("send_email", |s| {
            service(&emp, s, &format!("emailed {subject:?} to {}", emp.email))?;
            Ok(format!("msg_{}", &s.idempotency_key()[..10]))
        })?;
        emails_sent.push(id);
    }

    Ok(Onboarded { user_id: account.user_id, laptop, groups, emails_sent })
}
