//! The request's argv, as NUL-separated bytes in the mailbox.

/// Iterates the NUL-separated arguments of a request.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    bytes: &'a [u8],
}

impl<'a> Args<'a> {
    /// Wraps the request bytes.
    pub fn new(bytes: &'a [u8]) -> Self {
        Args { bytes }
    }

    /// Argument `n` (0 is the command name).
    pub fn get(&self, n: usize) -> Option<&'a [u8]> {
        self.iter().nth(n)
    }

    /// All arguments in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let all = self.bytes;
        let bytes = all.strip_suffix(&[0]).unwrap_or(all);
        bytes
            .split(|b| *b == 0)
            .take(if all.is_empty() { 0 } else { usize::MAX })
    }

    /// Argument `n` as a decimal number, `default` when absent.
    pub fn number(&self, n: usize, default: u64) -> Result<u64, ()> {
        match self.get(n) {
            None => Ok(default),
            Some(text) => parse_u64(text),
        }
    }
}

/// Parses a decimal u64.
pub fn parse_u64(text: &[u8]) -> Result<u64, ()> {
    if text.is_empty() {
        return Err(());
    }
    let mut value: u64 = 0;
    for b in text {
        let digit = b.checked_sub(b'0').filter(|d| *d < 10).ok_or(())?;
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit)))
            .ok_or(())?;
    }
    Ok(value)
}

/// Parses a decimal i32 with an optional sign.
pub fn parse_i32(text: &[u8]) -> Result<i32, ()> {
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = parse_u64(digits)?;
    let value = if negative {
        -(magnitude as i64)
    } else {
        magnitude as i64
    };
    i32::try_from(value).map_err(|_| ())
}
