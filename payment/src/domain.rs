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
    /// The order is known cancelled: nothing.
    Nothing,
}

/// Decide on `inventory.reserved`: never charge an order known cancelled. (Never twice either:
/// the store's insert leaves an order's existing payment as it is.)
pub fn on_reserved(known_cancelled: bool) -> OnReserved {
    if known_cancelled {
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
    /// Authorized: to be captured or voided.
    Approved,
    /// Refused.
    Declined,
    /// Could not be reached, and holds nothing for this charge (never reached, or asked
    /// afterwards and it does not know the key).
    Unavailable,
    /// Could not be reached, nor asked afterwards what it did: it may hold an authorization.
    Uncertain,
}

/// What a customer's account says to holding the amount of a payment before the provider is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The balance not held by other payments covers it: hold it and ask the provider.
    Take,
    /// The balance covers it, but not beside what other payments hold: ask again once they
    /// settle, rather than get an approval that may not be capturable.
    Wait,
    /// Never chargeable as things stand: fail without asking the provider.
    Refuse(FailReason),
}

/// Decide the hold. `account` is (balance, held by pending payments, currency).
pub fn hold(account: Option<(i64, i64, &str)>, amount: i64, currency: &str) -> Hold {
    let Some((balance, held, account_currency)) = account else {
        return Hold::Refuse(FailReason::PaymentDeclined);
    };
    if let Err(reason) = precheck(Some((balance, account_currency)), amount, currency) {
        return Hold::Refuse(reason);
    }
    if balance - held < amount {
        Hold::Wait
    } else {
        Hold::Take
    }
}

/// What the provider is still owed for a charge once it settled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// Captured here: capture the authorization.
    Capture,
    /// Not captured here: release whatever the provider may have authorized.
    Void,
}

impl FollowUp {
    /// Stored form (`payments.provider_due`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Void => "void",
        }
    }
    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Capture, Self::Void]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
    /// Stored form once done (`payments.provider_done`).
    pub fn done(self) -> &'static str {
        match self {
            Self::Capture => "captured",
            Self::Void => "voided",
        }
    }
}

/// What the provider is owed, given how the payment stands after settling and what the provider
/// answered. Every approval ends captured or voided.
pub fn follow_up(status: PaymentStatus, answer: ProviderAnswer) -> Option<FollowUp> {
    match (status, answer) {
        (PaymentStatus::Captured, ProviderAnswer::Approved) => Some(FollowUp::Capture),
        (PaymentStatus::Failed, ProviderAnswer::Approved | ProviderAnswer::Uncertain) => {
            Some(FollowUp::Void)
        }
        _ => None,
    }
}

/// How a pending payment settles, given what the account can pay and what the provider said.
/// The balance is re-checked here, at capture time, so it never goes negative even if it was
/// lowered while the provider was asked.
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
        ProviderAnswer::Unavailable | ProviderAnswer::Uncertain => {
            Err(FailReason::PaymentUnavailable)
        }
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
        assert_eq!(on_reserved(true), OnReserved::Nothing);
        assert_eq!(on_reserved(false), OnReserved::Charge);
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
    fn a_hold_waits_for_what_other_payments_hold_and_refuses_what_can_never_be_paid() {
        assert_eq!(hold(Some((1000, 0, "EUR")), 1000, "EUR"), Hold::Take);
        assert_eq!(hold(Some((1000, 400, "EUR")), 600, "EUR"), Hold::Take);
        assert_eq!(hold(Some((1000, 400, "EUR")), 700, "EUR"), Hold::Wait);
        assert_eq!(
            hold(Some((1000, 0, "EUR")), 1001, "EUR"),
            Hold::Refuse(FailReason::InsufficientFunds)
        );
        assert_eq!(
            hold(Some((1000, 0, "EUR")), 10, "USD"),
            Hold::Refuse(FailReason::PaymentDeclined)
        );
        assert_eq!(
            hold(None, 10, "EUR"),
            Hold::Refuse(FailReason::PaymentDeclined)
        );
    }

    #[test]
    fn every_approval_is_followed_by_a_capture_or_a_void() {
        use ProviderAnswer as A;
        assert_eq!(follow_up(S::Captured, A::Approved), Some(FollowUp::Capture));
        assert_eq!(follow_up(S::Failed, A::Approved), Some(FollowUp::Void));
        assert_eq!(follow_up(S::Failed, A::Uncertain), Some(FollowUp::Void));
        assert_eq!(follow_up(S::Failed, A::Declined), None);
        assert_eq!(follow_up(S::Failed, A::Unavailable), None);
        assert_eq!(follow_up(S::Refunded, A::Approved), None);
        for f in [FollowUp::Capture, FollowUp::Void] {
            assert_eq!(FollowUp::parse(f.as_str()), Some(f));
        }
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
        assert_eq!(
            settle(eur, 10, "EUR", ProviderAnswer::Uncertain),
            Err(FailReason::PaymentUnavailable)
        );
    }
}
