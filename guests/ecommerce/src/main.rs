//! E-commerce order pipeline, with independent steps overlapped:
//!
//! ```text
//! validate (2 s)
//!   -> reserve_inventory (3 s) | fraud_check (4 s) | shipping_quote (3 s)
//!   -> charge_payment (5 s, with an idempotency key)
//!   -> ship (4 s) | send_receipt (2 s) | notify_warehouse (2 s)
//! ```
//!
//! Step by step that is 25 s; overlapped it is 15 s. The durations are
//! multiplied by `time_scale` (default 0: instant; 1: the durations above).
//! With a directory granted as `/out`, every side effect appends a line to
//! `/out/effects.log`.
//!
//! ```sh
//! cairn run target/wasm32-wasip1/release/ecommerce.wasm --dir out::/out \
//!   --input '{"order_id":"A-1","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250}],"time_scale":1}'
//! ```
//!
//! With `payment_url` in the input the services are real calls (ABI
//! version 2): the inventory lives in the key-value store (`stock/SKU`,
//! 10 units of a SKU never stocked), the charge is an HTTP `POST
//! {payment_url}/charges` with the step's idempotency key (run with
//! `--allow-http HOST:PORT`), and when shipping fails for good
//! (`"fail_shipping": true`) the workflow compensates: it refunds the
//! charge and releases the inventory, newest first, then fails.
//! `target/release/fake-payments` is such a service; `make demo-ecommerce`
//! tells the story with a kill -9 in the middle of the charge.

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Branch, Ctx, Error, Step};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    order_id: String,
    customer: String,
    items: Vec<Item>,
    #[serde(default)]
    time_scale: f64,
    /// A payment service's base URL: charge and refund over HTTP, keep the
    /// inventory in the key-value store, compensate on failure.
    #[serde(default)]
    payment_url: Option<String>,
    /// With `payment_url`: shipping fails for good (to show compensation).
    #[serde(default)]
    fail_shipping: bool,
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
    quote_cents: u64,
}

#[derive(Serialize)]
struct Receipt {
    order_id: String,
    total_cents: u64,
    risk_score: u32,
    reservation: Reservation,
    charge: Charge,
    shipment: Shipment,
    receipt_sent: bool,
    warehouse_notified: bool,
}

fn main() {
    cairn_sdk::run(workflow)
}

/// Call a (simulated) service that takes `seconds` (scaled), and record the
/// side effect.
fn service(order: &Order, s: &Step, seconds: f64, what: &str) -> Result<(), Error> {
    std::thread::sleep(Duration::from_secs_f64(seconds * order.time_scale.max(0.0)));
    if std::fs::metadata("/out").is_ok() {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open("/out/effects.log")?;
        log.write_all(format!("{} {} {what}\n", s.name(), s.idempotency_key()).as_bytes())?;
    }
    eprintln!("  [{}] {what}", s.name());
    Ok(())
}

fn validate(ctx: &mut Ctx, order: &Order) -> Result<u64, Error> {
    ctx.step("validate", |s| {
        if order.items.is_empty() {
            return Err(Error::permanent("an order needs at least one item"));
        }
        let total = order.items.iter().map(|i| i.qty as u64 * i.unit_cents).sum();
        service(order, s, 2.0, &format!("validated {} for {total} cents", order.order_id))?;
        Ok(total)
    })
}

/// The fraud check and the shipping quote, as two branches.
fn fraud_check_and_quote(ctx: &mut Ctx, order: &Order) -> Result<(Branch<u32>, Branch<u64>), Error> {
    let fraud = ctx.spawn("fraud_check", |s| {
        service(order, s, 4.0, &format!("scored {} as low risk", order.customer))?;
        Ok(7u32)
    })?;
    let quote = ctx.spawn("shipping_quote", |s| {
        service(order, s, 3.0, "quoted 499 cents for shipping")?;
        Ok(499u64)
    })?;
    Ok((fraud, quote))
}

fn workflow(ctx: &mut Ctx, order: Order) -> Result<Receipt, Error> {
    if order.payment_url.is_some() {
        return with_payments(ctx, order);
    }
    let total_cents = validate(ctx, &order)?;

    // Three independent checks at once.
    let reserve = ctx.spawn("reserve_inventory", |s| {
        service(&order, s, 3.0, &format!("reserved {} skus", order.items.len()))?;
        Ok(Reservation { reservation_id: format!("res_{}", &s.idempotency_key()[..12]), skus: order.items.len() })
    })?;
    let (fraud, quote) = fraud_check_and_quote(ctx, &order)?;
    let (reservation, risk_score): (Reservation, u32) = ctx.join2(reserve, fraud)?;
    let quote_cents: u64 = ctx.join_all(vec![quote])?.remove(0);
    if risk_score > 50 {
        return Err(Error::permanent("the order looks fraudulent"));
    }

    let charge: Charge = ctx.step("charge_payment", |s| {
        // A real provider gets the key as its Idempotency-Key header: a
        // charge retried after a crash is recognized, not taken twice.
        service(&order, s, 5.0, &format!("charged {} cents to {}", total_cents + quote_cents, order.customer))?;
        Ok(Charge { charge_id: format!("ch_{}", &s.idempotency_key()[..16]), amount_cents: total_cents + quote_cents })
    })?;

    let ship = ctx.spawn("ship", |s| {
        service(&order, s, 4.0, "handed to the carrier")?;
        Ok(format!("TRK{}", &s.idempotency_key()[..10].to_uppercase()))
    })?;
    let receipt = ctx.spawn("send_receipt", |s| {
        service(&order, s, 2.0, &format!("emailed the receipt to {}", order.customer))?;
        Ok(true)
    })?;
    let warehouse = ctx.spawn("notify_warehouse", |s| {
        service(&order, s, 2.0, "told the warehouse")?;
        Ok(true)
    })?;
    let (tracking, receipt_sent): (String, bool) = ctx.join2(ship, receipt)?;
    let (warehouse_notified, _): (bool, bool) = (ctx.join_all(vec![warehouse])?[0], true);

    Ok(Receipt {
        order_id: order.order_id.clone(),
        total_cents,
        risk_score,
        reservation,
        charge,
        shipment: Shipment { tracking, quote_cents },
        receipt_sent,
        warehouse_notified,
    })
}

/// Units of a SKU the key-value store has never seen.
const INITIAL_STOCK: u64 = 10;

fn stock_key(sku: &str) -> String {
    format!("stock/{sku}")
}

/// The order with real effects: inventory in the key-value store, payment
/// over HTTP, compensations when shipping fails for good.
fn with_payments(ctx: &mut Ctx, order: Order) -> Result<Receipt, Error> {
    let url = order.payment_url.clone().unwrap_or_default();
    let total_cents = validate(ctx, &order)?;

    // Taking stock and putting it back are writes committed with their
    // steps: exactly once, whatever crashes.
    let items = order.items.clone();
    let reservation: Reservation = ctx.step_with_compensation(
        "reserve_inventory",
        |s| {
            let kv = s.kv();
            for item in &order.items {
                let left: u64 = kv.get(&stock_key(&item.sku))?.unwrap_or(INITIAL_STOCK);
                if left < item.qty as u64 {
                    return Err(Error::permanent(format!("{} is out of stock ({left} left)", item.sku)));
                }
                kv.put(&stock_key(&item.sku), &(left - item.qty as u64))?;
            }
            service(&order, s, 3.0, &format!("reserved {} skus", order.items.len()))?;
            Ok(Reservation { reservation_id: format!("res_{}", &s.idempotency_key()[..12]), skus: order.items.len() })
        },
        move |s, reservation: Reservation| {
            let kv = s.kv();
            for item in &items {
                let left: u64 = kv.get(&stock_key(&item.sku))?.unwrap_or(INITIAL_STOCK);
                kv.put(&stock_key(&item.sku), &(left + item.qty as u64))?;
            }
            eprintln!("  [{}] released {}", s.name(), reservation.reservation_id);
            Ok(())
        },
    )?;

    let (fraud, quote) = fraud_check_and_quote(ctx, &order)?;
    let (risk_score, quote_cents): (u32, u64) = ctx.join2(fraud, quote)?;

    let refund_url = url.clone();
    let charge = ctx.step_with_compensation(
        "charge_payment",
        |s| {
            // The provider gets the step's key (the SDK sends it as the
            // Idempotency-Key header): a charge sent again after a crash is
            // answered with the first charge, not taken twice.
            let amount = total_cents + quote_cents;
            let response = s
                .http()
                .post(format!("{url}/charges"))
                .json(&serde_json::json!({"amount_cents": amount, "order_id": order.order_id}))
                .send()?;
            match response.status() {
                200..=299 => {}
                400..=499 => return Err(Error::permanent(format!("the card was declined ({})", response.status()))),
                status => return Err(Error::new(format!("the payment service answered {status}"))),
            }
            let body: serde_json::Value = response.json()?;
            service(&order, s, 5.0, &format!("charged {amount} cents to {}", order.customer))?;
            Ok(Charge { charge_id: body["id"].as_str().unwrap_or_default().to_string(), amount_cents: amount })
        },
        move |s, charge: Charge| {
            let response = s
                .http()
                .post(format!("{refund_url}/refunds"))
                .json(&serde_json::json!({"charge_id": charge.charge_id}))
                .send()?;
            if !(200..300).contains(&response.status()) {
                return Err(Error::new(format!(
                    "the refund of {} was answered {}",
                    charge.charge_id,
                    response.status()
                )));
            }
            eprintln!("  [{}] refunded {}", s.name(), charge.charge_id);
            Ok(())
        },
    )?;

    let shipped = ctx.step("ship", |s| {
        if order.fail_shipping {
            return Err(Error::permanent("the carrier refused the parcel"));
        }
        service(&order, s, 4.0, "handed to the carrier")?;
        Ok(format!("TRK{}", &s.idempotency_key()[..10].to_uppercase()))
    });
    let tracking = match shipped {
        Ok(tracking) => tracking,
        Err(e) => {
            // Roll back what was done, newest first: refund, then release.
            ctx.compensate()?;
            return Err(e);
        }
    };
    let receipt_sent = ctx.step("send_receipt", |s| {
        service(&order, s, 2.0, &format!("emailed the receipt to {}", order.customer))?;
        Ok(true)
    })?;

    Ok(Receipt {
        order_id: order.order_id.clone(),
        total_cents,
        risk_score,
        reservation,
        charge,
        shipment: Shipment { tracking, quote_cents },
        receipt_sent,
        warehouse_notified: false,
    })
}
