//! Locking helpers shared by the daemon's modules.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: every mutex in the daemon guards plain
/// values or maps updated in one step, which stay consistent across a
/// panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
