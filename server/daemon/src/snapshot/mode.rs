//! A snapshot's mode in its three types, and the one conversion between
//! each pair: the API's `forkd.v1.BranchMode` (with the legacy `diff`
//! flag) into the store's [`Mode`] ([`resolve_mode`]), the store's back
//! into the API's ([`to_proto`]), and the store's into the control
//! protocol's [`SnapshotMode`] ([`to_control`]).

use forkd_api::v1::BranchMode;
use forkd_control::SnapshotMode;
use forkd_store::Mode;

use crate::api::error::ApiError;

/// Resolves a request's `mode`, legacy `diff` flag and `wait` into the mode
/// to use and whether to wait for READY: `mode` wins; UNSPECIFIED means
/// DIFF with `diff`, else FULL. `wait` (default true) may be false only for
/// LIVE.
pub fn resolve_mode(mode: i32, diff: bool, wait: Option<bool>) -> Result<(Mode, bool), ApiError> {
    let mode = BranchMode::try_from(mode).map_err(|_| {
        ApiError::InvalidArgument(format!(
            "mode {mode} is not a BranchMode; use FULL, DIFF or LIVE"
        ))
    })?;
    let resolved = match (mode, diff) {
        (BranchMode::Unspecified, true) | (BranchMode::Diff, _) => Mode::Diff,
        (BranchMode::Unspecified, false) | (BranchMode::Full, false) => Mode::Full,
        (BranchMode::Live, false) => Mode::Live,
        (BranchMode::Full | BranchMode::Live, true) => {
            return Err(ApiError::InvalidArgument(format!(
                "diff=true contradicts mode={}; set only mode",
                mode.as_str_name()
            )))
        }
    };
    if wait == Some(false) && resolved != Mode::Live {
        return Err(ApiError::InvalidArgument(
            "wait=false applies to LIVE only; FULL and DIFF branches always wait".into(),
        ));
    }
    Ok((resolved, wait.unwrap_or(true)))
}

/// The API's name of a snapshot's mode.
pub fn to_proto(mode: Mode) -> BranchMode {
    match mode {
        Mode::Full => BranchMode::Full,
        Mode::Diff => BranchMode::Diff,
        Mode::Live => BranchMode::Live,
    }
}

/// The mode to ask the VMM for.
pub fn to_control(mode: Mode) -> SnapshotMode {
    match mode {
        Mode::Full => SnapshotMode::Full,
        Mode::Diff => SnapshotMode::Diff,
        Mode::Live => SnapshotMode::Live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn code(r: Result<(Mode, bool), ApiError>) -> Code {
        r.unwrap_err().code()
    }

    fn mode(r: Result<(Mode, bool), ApiError>) -> Mode {
        r.unwrap().0
    }

    #[test]
    fn mode_wins_and_legacy_diff_still_works() {
        let (u, f, d, l) = (
            BranchMode::Unspecified as i32,
            BranchMode::Full as i32,
            BranchMode::Diff as i32,
            BranchMode::Live as i32,
        );
        assert_eq!(mode(resolve_mode(u, false, None)), Mode::Full);
        assert_eq!(mode(resolve_mode(u, true, None)), Mode::Diff);
        assert_eq!(mode(resolve_mode(f, false, None)), Mode::Full);
        assert_eq!(mode(resolve_mode(d, false, None)), Mode::Diff);
        assert_eq!(mode(resolve_mode(d, true, Some(true))), Mode::Diff);
        assert_eq!(code(resolve_mode(f, true, None)), Code::InvalidArgument);
        assert_eq!(code(resolve_mode(l, true, None)), Code::InvalidArgument);
        let err = resolve_mode(f, true, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "diff=true contradicts mode=BRANCH_MODE_FULL; set only mode"
        );
        assert_eq!(code(resolve_mode(99, false, None)), Code::InvalidArgument);
    }

    #[test]
    fn wait_defaults_to_true_and_false_is_for_live_only() {
        let err = resolve_mode(BranchMode::Full as i32, false, Some(false)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("wait=false applies to LIVE only"));
        assert_eq!(
            code(resolve_mode(
                BranchMode::Unspecified as i32,
                true,
                Some(false)
            )),
            Code::InvalidArgument
        );
        let live = BranchMode::Live as i32;
        assert_eq!(resolve_mode(live, false, None).unwrap(), (Mode::Live, true));
        assert_eq!(
            resolve_mode(live, false, Some(true)).unwrap(),
            (Mode::Live, true)
        );
        assert_eq!(
            resolve_mode(live, false, Some(false)).unwrap(),
            (Mode::Live, false)
        );
        assert_eq!(
            resolve_mode(BranchMode::Full as i32, false, Some(true)).unwrap(),
            (Mode::Full, true)
        );
    }
}
