//! Payment's rules: when to charge, when never to, when to refund, and how a charge settles.
//! Pure functions; the store and the processor apply their answers.

/// A payment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Created from a reservation; the charge has not settled yet.
    Pending,
    /// Money taken from the customer's balance.
    Captured,
    /// Captured, then given back.
    Refunded,
    /// Not taken (declined, insufficient funds, provider down, or order cancelled first).
    Failed,
}

impl PaymentStatus {
    /// Stored and displayed form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Captured => "CAPTURED",
            Self::Refunded => "REFUNDED",
            Self::Failed => "FAILED",
        }
    }
    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Captured, Self::Refunded, Self::Failed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// Why a charge failed; carried by `payments.failed.v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Balance lower than the amount.
    InsufficientFunds,
    /// Provider said no, or the account cannot pay in this currency / does not exist.
    PaymentDeclined,
    /// Provider unreachable after retries, or its circuit is open.
    PaymentUnavailable,
    /// The order was cancelled before the charge settled; nothing is announced.
    OrderCancelled,
}

impl FailReason {
    /// Wire and stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "insufficient_funds",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentUnavailable => "payment_unavailable",
            Self::OrderCancelled => "order_cancelled",
        }
    }
}

/// What to do when stock was reserved for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReserved {
    /// Start a payment.
    Charge,
    /// The order is known cancelled, or a payment already exists: nothing.
    Nothing,
}

/// Decide on `inventory.reserved`: never charge an order known cancelled, never charge twice.
pub fn on_reserved(existing: Option<PaymentStatus>, known_cancelled: bool) -> OnReserved {
    if known_cancelled || existing.is_some() {
        OnReserved::Nothing
    } else {
        OnReserved::Charge
    }
}

/// What to do when an order is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCancelled {
    /// Give the money back.
    Refund,
    /// Stop the pending charge; nothing was taken.
    Void,
    /// Nothing was or will be taken (remember the cancellation all the same).
    Nothing,
}

/// Decide on `orders.cancelled`.
pub fn on_cancelled(existing: Option<PaymentStatus>) -> OnCancelled {
    match existing {
        Some(PaymentStatus::Captured) => OnCancelled::Refund,
        Some(PaymentStatus::Pending) => OnCancelled::Void,
        _ => OnCancelled::Nothing,
    }
}

/// What the provider said about a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderAnswer {
    /// Charged.
    Approved,
    /// Refused.
    Declined,
    /// Could not be reached.
    Unavailable,
}

/// How a pending payment settles, given what the account can pay and what the provider said.
/// The balance is re-checked here, at capture time, so it never goes negative even when two
/// orders of one customer race.
pub fn settle(
    balance: Option<(i64, &str)>,
    amount: i64,
    currency: &str,
    answer: ProviderAnswer,
) -> Result<(), FailReason> {
    let Some((balance, account_currency)) = balance else {
        return Err(FailReason::PaymentDeclined);
    };
    if account_currency != currency {
        return Err(FailReason::PaymentDeclined);
    }
    if balance < amount {
        return Err(FailReason::InsufficientFunds);
    }
    match answer {
        ProviderAnswer::Approved => Ok(()),
        ProviderAnswer::Declined => Err(FailReason::PaymentDeclined),
        ProviderAnswer::Unavailable => Err(FailReason::PaymentUnavailable),
    }
}

/// Checks done before calling the provider at all (no point charging an empty account).
pub fn precheck(
    balance: Option<(i64, &str)>,
    amount: i64,
    currency: &str,
) -> Result<(), FailReason> {
    settle(balance, amount, currency, ProviderAnswer::Approved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PaymentStatus as S;

    #[test]
    fn a_cancellation_seen_first_means_never_charge() {
        assert_eq!(on_reserved(None, true), OnReserved::Nothing);
        assert_eq!(on_reserved(None, false), OnReserved::Charge);
    }

    #[test]
    fn a_reservation_is_charged_once() {
        for s in [S::Pending, S::Captured, S::Refunded, S::Failed] {
            assert_eq!(on_reserved(Some(s), false), OnReserved::Nothing);
        }
    }

    #[test]
    fn a_cancellation_after_the_charge_refunds_once() {
        assert_eq!(on_cancelled(Some(S::Captured)), OnCancelled::Refund);
        assert_eq!(on_cancelled(Some(S::Refunded)), OnCancelled::Nothing);
        assert_eq!(on_cancelled(Some(S::Pending)), OnCancelled::Void);
        assert_eq!(on_cancelled(Some(S::Failed)), OnCancelled::Nothing);
        assert_eq!(on_cancelled(None), OnCancelled::Nothing);
    }

    #[test]
    fn settling_checks_account_then_provider() {
        let eur = Some((1000, "EUR"));
        assert_eq!(settle(eur, 1000, "EUR", ProviderAnswer::Approved), Ok(()));
        assert_eq!(
            settle(eur, 1001, "EUR", ProviderAnswer::Approved),
            Err(FailReason::InsufficientFunds)
        );
        assert_eq!(
            settle(eur, 10, "USD", ProviderAnswer::Approved),
            Err(FailReason::PaymentDeclined)
        );
        assert_eq!(
            settle(None, 10, "EUR", ProviderAnswer::Approved),
            Err(FailReason::PaymentDeclined)
        );
        assert_eq!(
            settle(eur, 10, "EUR", ProviderAnswer::Declined),
            Err(FailReason::PaymentDeclined)
        );
        assert_eq!(
            settle(eur, 10, "EUR", ProviderAnswer::Unavailable),
            Err(FailReason::PaymentUnavailable)
        );
    }
}
