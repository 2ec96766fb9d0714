//! The shapes of identifiers every service accepts, checked the same way everywhere (HTTP, events,
//! commands, the gateway's tokens), so an id valid at one door is valid at all of them.

/// An identifier (customer, SKU, …): 1-64 characters of ASCII letters, digits and `-_.:@`.
pub fn valid_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
}

/// An ISO 4217-shaped currency code: three ASCII capital letters.
pub fn valid_currency(s: &str) -> bool {
    s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_currencies() {
        assert!(valid_identifier("alice"));
        assert!(valid_identifier("sku-1_a.b:c@d"));
        assert!(!valid_identifier(""));
        assert!(!valid_identifier(&"x".repeat(65)));
        assert!(!valid_identifier("a b"));
        assert!(!valid_identifier("ä"));
        assert!(valid_currency("EUR"));
        assert!(!valid_currency("eur"));
        assert!(!valid_currency("EURO"));
    }
}
