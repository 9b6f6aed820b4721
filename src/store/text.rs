//! Text from outside as the store can keep it. PostgreSQL's text cannot hold a NUL character
//! (every statement binding one fails, and the request that carried it would be a 503 on every
//! retry); SQLite can. So that both behave alike, free text is stored with U+FFFD in its
//! place, and a key with a NUL, which can never have been stored, finds nothing.

/// `s` with every NUL replaced by U+FFFD (an owned copy: sqlx's `Any` binds no `Cow`).
pub(super) fn storable(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// Whether a key could be in the store at all: ids and names we stored never hold a NUL.
pub(super) fn could_be_stored(key: &str) -> bool {
    !key.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character_and_nothing_else_changes() {
        assert_eq!(storable("plain ünï"), "plain ünï");
        assert_eq!(storable("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(!could_be_stored("inc\0"));
        assert!(could_be_stored("inc-1"));
    }
}
