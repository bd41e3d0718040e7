//! Assertions on the status a failed call returned.

use tonic::{Code, Status};

/// Asserts that `result` failed with `code` and a message containing each
/// of `contains`; returns the status.
#[track_caller]
pub fn assert_status<T>(result: Result<T, Status>, code: Code, contains: &[&str]) -> Status {
    let status = match result {
        Ok(_) => panic!("expected {code:?}, the call succeeded"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for part in contains {
        assert!(
            status.message().contains(part),
            "{:?} does not contain {part:?}",
            status.message()
        );
    }
    status
}

/// Asserts that `result` failed with `code` and exactly `message`; returns
/// the status.
#[track_caller]
pub fn assert_status_eq<T>(result: Result<T, Status>, code: Code, message: &str) -> Status {
    let status = assert_status(result, code, &[]);
    assert_eq!(status.message(), message, "{status:?}");
    status
}
