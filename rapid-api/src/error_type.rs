//! Normalisation of the error types runtimes report.
//!
//! Lambda accepts `(Runtime|Function).[A-Z][a-zA-Z]+` in the `Lambda-Runtime-Function-Error-Type`
//! header; anything else becomes `Function.Unknown` when it starts with `Function.`, else
//! `Runtime.Unknown`. Runtimes also put their own type (e.g. `ValueError`) in the JSON body:
//! that body value is left alone, only the header type is normalised.

/// Returns the error type Lambda would record for a header value.
pub fn normalise(raw: Option<&str>) -> String {
    let raw = raw.unwrap_or("").trim();
    if is_valid(raw) {
        return raw.to_string();
    }
    if raw.starts_with("Function.") {
        "Function.Unknown".to_string()
    } else {
        "Runtime.Unknown".to_string()
    }
}

fn is_valid(s: &str) -> bool {
    let rest = match s.split_once('.') {
        Some(("Runtime", rest)) | Some(("Function", rest)) => rest,
        _ => return false,
    };
    let mut chars = rest.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && rest.len() >= 2
        && chars.all(|c| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn valid_types_pass_through() {
        assert_eq!(
            normalise(Some("Runtime.ImportModuleError")),
            "Runtime.ImportModuleError"
        );
        assert_eq!(normalise(Some("Function.MyError")), "Function.MyError");
    }

    #[test]
    fn invalid_types_are_normalised() {
        assert_eq!(normalise(Some("Function.bad")), "Function.Unknown");
        assert_eq!(normalise(Some("Function.X")), "Function.Unknown");
        assert_eq!(normalise(Some("Function.Bad1")), "Function.Unknown");
        assert_eq!(normalise(Some("ValueError")), "Runtime.Unknown");
        assert_eq!(normalise(Some("Runtime.")), "Runtime.Unknown");
        assert_eq!(normalise(None), "Runtime.Unknown");
        assert_eq!(normalise(Some("Other.Thing")), "Runtime.Unknown");
    }
}
