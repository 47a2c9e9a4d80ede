//! The order-fulfilment business rules, as pure and synchronous aggregates.
//!
//! Each aggregate is a type implementing [`Aggregate`]: `decide(&state, &command)` holds every
//! business rule and answers with at most one event (one command, one record: see
//! `ARCHITECTURE.md`), and `evolve(state, &event)` folds an event into the state without ever
//! failing or validating. Nothing here does IO; whatever a decision needs from outside (a payment
//! provider's answer, a stock level elsewhere) is put into the command by the caller.
//!
//! # Layout
//! - [`aggregate`]: the [`Aggregate`] trait and [`Decision`], shared by every aggregate.
//! - [`values`]: newtypes parsed at the edge (`OrderId`, `Sku`, `Quantity`, `CustomerId`, ...).
//! - [`money`]: [`Money`] as integer minor units plus an ISO 4217 [`Currency`]; no floats.
//! - [`customer`]: a customer's registration, email and erasure; personal fields only sealed.
//! - [`order`]: the order and its status machine (place, confirm, reject, cancel, ship).
//! - [`payment`]: one payment per order (authorise, capture, refund, void).
//! - [`stock`]: one stock item per SKU (receive, adjust, reserve, release, commit).
//! - [`testing`]: the given/when/then harness the aggregates' tests are written with.

pub mod aggregate;
pub mod customer;
pub mod money;
pub mod order;
pub mod payment;
pub mod stock;
pub mod testing;
pub mod values;

pub use aggregate::{Aggregate, Decision};
pub use money::{Currency, Money, MoneyError};
pub use values::{CustomerId, OrderId, PaymentToken, Quantity, Sku, ValueError};
