//! Employee onboarding: create the account, provision a laptop, grant
//! access, then send the welcome emails (one `send_email` step per email:
//! the same step name in a loop gets occurrences 1, 2, 3, ...).
//!
//! ```sh
//! cairn run target/wasm32-wasip1/release/onboarding.wasm \
//!   --input '{"name":"Ada Lovelace","email":"ada@example.com","team":"engines"}'
//! ```

use std::time::Duration;

use cairn_sdk::{Ctx, Error};
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

#[derive(Serialize, Deserialize)]
struct Laptop {
    asset_tag: String,
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

fn workflow(ctx: &mut Ctx, emp: Employee) -> Result<Onboarded, Error> {
    let wait = Duration::from_millis(emp.simulate_ms);

    let account: Account = ctx.step("create_account", |s| {
        std::thread::sleep(wait);
        eprintln!("  created account for {}", emp.name);
        Ok(Account { user_id: format!("u_{}", &s.idempotency_key()[..8]) })
    })?;

    let laptop: Laptop = ctx.step("provision_laptop", |s| {
        std::thread::sleep(wait);
        eprintln!("  provisioned a laptop for {}", account.user_id);
        Ok(Laptop { asset_tag: format!("LT-{}", &s.idempotency_key()[..6].to_uppercase()) })
    })?;

    let groups: Vec<String> = ctx.step("grant_access", |_s| {
        std::thread::sleep(wait);
        let groups = vec!["everyone".to_string(), emp.team.clone()];
        eprintln!("  granted {groups:?} to {}", account.user_id);
        Ok(groups)
    })?;

    let mut emails_sent = Vec::new();
    for subject in ["Welcome aboard", "Your laptop is ready", "Meet your team"] {
        // Same step name each time: occurrences 1, 2, 3, each with its own
        // idempotency key, so the mail service deduplicates a resent email.
        let id: String = ctx.step("send_email", |s| {
            std::thread::sleep(wait);
            eprintln!("  emailed {:?} to {}", subject, emp.email);
            Ok(format!("msg_{}", &s.idempotency_key()[..10]))
        })?;
        emails_sent.push(id);
    }

    Ok(Onboarded { user_id: account.user_id, laptop: laptop.asset_tag, groups, emails_sent })
}
