//! E-commerce order pipeline: validate the order, reserve inventory, charge
//! the payment (with an idempotency key), ship, notify.
//!
//! The "services" are simulated: each step takes `simulate_ms` of wall time
//! (default 0) and, when a directory is granted as `/out`, appends a line
//! to `/out/effects.log` so you can count how often each side effect ran.
//!
//! ```sh
//! cairn run target/wasm32-wasip1/release/ecommerce.wasm --dir out::/out \
//!   --input '{"order_id":"A-1","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250}]}'
//! ```

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Ctx, Error, Step};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    order_id: String,
    customer: String,
    items: Vec<Item>,
    #[serde(default)]
    simulate_ms: u64,
}

#[derive(Deserialize, Serialize, Clone)]
struct Item {
    sku: String,
    qty: u32,
    unit_cents: u64,
}

#[derive(Serialize, Deserialize)]
struct Reservation {
    reservation_id: String,
    skus: usize,
}

#[derive(Serialize, Deserialize)]
struct Charge {
    charge_id: String,
    amount_cents: u64,
}

#[derive(Serialize, Deserialize)]
struct Shipment {
    tracking: String,
}

#[derive(Serialize)]
struct Receipt {
    order_id: String,
    total_cents: u64,
    reservation: Reservation,
    charge: Charge,
    shipment: Shipment,
    notified: bool,
}

fn main() {
    cairn_sdk::run(workflow)
}

/// Simulate the latency of a remote service and record the side effect.
fn effect(order: &Order, s: &Step, what: &str) -> Result<(), Error> {
    std::thread::sleep(Duration::from_millis(order.simulate_ms));
    if std::fs::metadata("/out").is_ok() {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open("/out/effects.log")?;
        writeln!(log, "{} {} {}", s.name(), s.idempotency_key(), what)?;
    }
    eprintln!("  [{}] {what}", s.name());
    Ok(())
}

fn workflow(ctx: &mut Ctx, order: Order) -> Result<Receipt, Error> {
    let total_cents: u64 = ctx.step("validate", |s| {
        if order.items.is_empty() {
            return Err(Error::permanent("an order needs at least one item"));
        }
        let total = order.items.iter().map(|i| i.qty as u64 * i.unit_cents).sum();
        effect(&order, s, &format!("validated {} for {total} cents", order.order_id))?;
        Ok(total)
    })?;

    let reservation: Reservation = ctx.step("reserve_inventory", |s| {
        effect(&order, s, &format!("reserved {} skus", order.items.len()))?;
        Ok(Reservation { reservation_id: format!("res_{}", &s.idempotency_key()[..12]), skus: order.items.len() })
    })?;

    let charge: Charge = ctx.step("charge_payment", |s| {
        // A real provider gets the key as its Idempotency-Key header.
        effect(&order, s, &format!("charged {total_cents} cents to {}", order.customer))?;
        Ok(Charge { charge_id: format!("ch_{}", &s.idempotency_key()[..16]), amount_cents: total_cents })
    })?;

    let shipment: Shipment = ctx.step("ship", |s| {
        effect(&order, s, "handed to the carrier")?;
        Ok(Shipment { tracking: format!("TRK{}", &s.idempotency_key()[..10].to_uppercase()) })
    })?;

    let notified: bool = ctx.step("notify", |s| {
        effect(&order, s, &format!("emailed {}", order.customer))?;
        Ok(true)
    })?;

    Ok(Receipt { order_id: order.order_id.clone(), total_cents, reservation, charge, shipment, notified })
}
