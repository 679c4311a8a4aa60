//! Names the registry gives things, truststores and the like.

use crate::RegistryError;

/// Checks a name given to a thing or truststore: 1–128 of `A-Z a-z 0-9 : _ - .`, so that names
/// are safe in URLs, file names, logs and templates.
pub fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.'))
        // `.` and `..` are path segments: such a name could not be named in a URL.
        && !name.bytes().all(|b| b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{kind} name '{}' must be 1-128 characters of A-Z a-z 0-9 : _ - ., not only dots",
            name.escape_debug()
        )))
    }
}
