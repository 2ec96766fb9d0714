//! Inventory's rules: all-or-nothing reservation, and what each saga event does to an order's
//! reservation. Pure functions; the store applies their answers.

use std::collections::BTreeMap;

/// Where one order stands, as inventory sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// Stock held for the order.
    Reserved,
    /// Refused (short or unknown SKU); nothing held.
    Rejected,
    /// Held, then given back.
    Released,
    /// Held, then sold.
    Committed,
    /// Cancelled before inventory saw it placed: a later placement reserves nothing.
    CancelledEarly,
}

impl OrderState {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "RESERVED",
            Self::Rejected => "REJECTED",
            Self::Released => "RELEASED",
            Self::Committed => "COMMITTED",
            Self::CancelledEarly => "CANCELLED_EARLY",
        }
    }
    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Reserved,
            Self::Rejected,
            Self::Released,
            Self::Committed,
            Self::CancelledEarly,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A saga event, as it matters to inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happening {
    /// `orders.placed`.
    Placed,
    /// `orders.confirmed`.
    Confirmed,
    /// `orders.cancelled` or `payments.failed`.
    Cancelled,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Try to reserve all lines (see [`reserve`]).
    TryReserve,
    /// Move reserved stock to sold.
    Commit,
    /// Give reserved stock back.
    Release,
    /// Remember the cancellation so a late placement reserves nothing.
    RememberCancellation,
    /// Nothing: duplicate, late or superseded.
    Nothing,
}

/// Decide from the order's current state (`None`: never seen).
pub fn decide(state: Option<OrderState>, happening: Happening) -> Action {
    use Happening as H;
    use OrderState as S;
    match (state, happening) {
        (None, H::Placed) => Action::TryReserve,
        (None, H::Cancelled) => Action::RememberCancellation,
        (Some(S::Reserved), H::Confirmed) => Action::Commit,
        (Some(S::Reserved), H::Cancelled) => Action::Release,
        // Everything else is a repeat or arrives after the end: placement after a cancellation,
        // release of what was never reserved or already released, confirmation of a non-reservation.
        _ => Action::Nothing,
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The SKU does not exist.
    UnknownSku(String),
    /// Not enough available.
    InsufficientStock(String),
}

impl Rejection {
    /// The reason carried by `inventory.rejected.v1`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownSku(_) => "unknown_sku",
            Self::InsufficientStock(_) => "insufficient_stock",
        }
    }
    /// The SKU at fault.
    pub fn sku(&self) -> &str {
        match self {
            Self::UnknownSku(s) | Self::InsufficientStock(s) => s,
        }
    }
}

/// All-or-nothing: lines merged per SKU (sorted, which is also the lock order), each available in
/// full, else the first SKU at fault. An unknown SKU wins over a short one.
pub fn reserve(
    lines: &[(String, i64)],
    available: &BTreeMap<String, i64>,
) -> Result<BTreeMap<String, i64>, Rejection> {
    // Lines were validated (bounded quantities and count), so the merge cannot overflow; an
    // overflow would still be refused as a shortage rather than wrap.
    let Some(wanted) = merge(lines) else {
        return Err(Rejection::InsufficientStock(
            lines.first().map(|l| l.0.clone()).unwrap_or_default(),
        ));
    };
    if let Some(sku) = wanted.keys().find(|s| !available.contains_key(*s)) {
        return Err(Rejection::UnknownSku(sku.clone()));
    }
    for (sku, qty) in &wanted {
        if available.get(sku).copied().unwrap_or(0) < *qty {
            return Err(Rejection::InsufficientStock(sku.clone()));
        }
    }
    Ok(wanted)
}

/// Quantities per SKU, in SKU order; `None` if a sum overflows.
pub fn merge(lines: &[(String, i64)]) -> Option<BTreeMap<String, i64>> {
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for (sku, qty) in lines {
        let total = wanted.entry(sku.clone()).or_insert(0);
        *total = total.checked_add(*qty)?;
    }
    Some(wanted)
}

/// Largest quantity of one line accepted from an event.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Most lines accepted in one order.
pub const MAX_LINES: usize = 100;

/// A SKU name: 1-64 characters of letters, digits and `-_.:@`.
pub fn valid_sku(s: &str) -> bool {
    event_toolkit::ids::valid_identifier(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Happening as H;
    use OrderState as S;

    fn stock(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
    }
    fn lines(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
    }

    #[test]
    fn reserves_all_lines_or_nothing() {
        let s = stock(&[("A", 5), ("B", 1)]);
        assert_eq!(
            reserve(&lines(&[("A", 2), ("B", 1), ("A", 3)]), &s).unwrap(),
            stock(&[("A", 5), ("B", 1)])
        );
        assert_eq!(
            reserve(&lines(&[("A", 2), ("B", 2)]), &s),
            Err(Rejection::InsufficientStock("B".into()))
        );
        assert_eq!(
            reserve(&lines(&[("A", 9), ("Z", 1)]), &s),
            Err(Rejection::UnknownSku("Z".into()))
        );
    }

    #[test]
    fn quantities_that_overflow_when_merged_are_refused_not_wrapped() {
        let s = stock(&[("A", 5)]);
        let huge = lines(&[("A", i64::MAX), ("A", 2)]);
        assert_eq!(merge(&huge), None);
        assert!(reserve(&huge, &s).is_err());
    }

    #[test]
    fn a_cancellation_before_the_placement_is_remembered() {
        assert_eq!(decide(None, H::Cancelled), Action::RememberCancellation);
        assert_eq!(decide(Some(S::CancelledEarly), H::Placed), Action::Nothing);
    }

    #[test]
    fn release_and_commit_happen_once() {
        assert_eq!(decide(Some(S::Reserved), H::Cancelled), Action::Release);
        assert_eq!(decide(Some(S::Released), H::Cancelled), Action::Nothing);
        assert_eq!(decide(Some(S::Reserved), H::Confirmed), Action::Commit);
        assert_eq!(decide(Some(S::Committed), H::Confirmed), Action::Nothing);
        assert_eq!(decide(Some(S::Committed), H::Cancelled), Action::Nothing);
    }

    #[test]
    fn a_placement_is_reserved_once() {
        assert_eq!(decide(None, H::Placed), Action::TryReserve);
        for s in [S::Reserved, S::Rejected, S::Released, S::Committed] {
            assert_eq!(decide(Some(s), H::Placed), Action::Nothing, "{s:?}");
        }
    }

    #[test]
    fn nothing_to_release_for_a_rejected_or_unknown_confirmation() {
        assert_eq!(decide(Some(S::Rejected), H::Cancelled), Action::Nothing);
        assert_eq!(decide(None, H::Confirmed), Action::Nothing);
    }
}
