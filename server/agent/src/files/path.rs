//! The path rules of file operations (enforced in the agent too): a path is
//! non-empty, absolute and free of NUL bytes. Nothing is normalised: `.`
//! and `..` components and repeated slashes go to the kernel as given (the
//! guest is the trust boundary, so `..` reaches nothing it could not
//! otherwise).

use crate::files::error::FileError;

/// Checks the path rules.
pub fn check(path: &str) -> Result<(), FileError> {
    if path.is_empty() {
        return Err(FileError::invalid(path, "empty"));
    }
    if !path.starts_with('/') {
        return Err(FileError::invalid(path, "not absolute"));
    }
    if path.contains('\0') {
        return Err(FileError::invalid(path, "contains a NUL byte"));
    }
    Ok(())
}

/// Splits the path of a file to write into its directory and file name.
/// The name must be a real one: not empty (a trailing `/`), `.` or `..`.
pub fn split_for_write(path: &str) -> Result<(&str, &str), FileError> {
    check(path)?;
    let cut = path.rfind('/').unwrap_or(0);
    let (dir, name) = (&path[..cut], &path[cut + 1..]);
    if name.is_empty() || name == "." || name == ".." {
        return Err(FileError::invalid(path, "does not end in a file name"));
    }
    Ok((if dir.is_empty() { "/" } else { dir }, name))
}

/// The last component of a path, for [`forkd_agent_proto::FileInfo::name`]
/// (`/` for the root).
pub fn last_component(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) => &trimmed[i + 1..],
        None if trimmed.is_empty() => "/",
        None => trimmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(check("/a/../b").is_ok());
        for bad in ["", "a", "./a", "/a\0b"] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        assert_eq!(split_for_write("/a").unwrap(), ("/", "a"));
        assert_eq!(split_for_write("/a/b/c").unwrap(), ("/a/b", "c"));
        assert_eq!(split_for_write("//a").unwrap(), ("/", "a"));
        for bad in ["/", "/a/", "/a/.", "/a/.."] {
            assert!(split_for_write(bad).is_err(), "{bad:?}");
        }
        assert_eq!(last_component("/"), "/");
        assert_eq!(last_component("/a/b/"), "b");
        assert_eq!(last_component("/a"), "a");
    }
}
