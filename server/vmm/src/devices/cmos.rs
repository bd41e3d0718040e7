//! A read-only CMOS real-time clock at ports 0x70/0x71: the guest kernel
//! reads the host's wall clock (UTC) from it at boot. Writes (alarms, the
//! guest setting the time) are ignored; NVRAM reads as zero.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::PortDevice;

/// Ports of the index and data registers.
pub const CMOS_PORT: u16 = 0x70;

/// The clock: the index last written to port 0x70.
#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    /// A clock with register `index` selected (a snapshot's).
    pub fn with_index(index: u8) -> Self {
        Cmos {
            index: index & 0x7f,
        }
    }

    /// The selected register, for a snapshot.
    pub fn index(&self) -> u8 {
        self.index
    }
}

fn bcd(value: u32) -> u8 {
    (((value / 10) << 4) | (value % 10)) as u8
}

/// Civil date (year, month, day) of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The register `index` at Unix time `secs`.
fn register(index: u8, secs: u64) -> u8 {
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    match index {
        0x00 => bcd(rem % 60),
        0x02 => bcd(rem / 60 % 60),
        0x04 => bcd(rem / 3600),
        0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u32), // 1970-01-01 was a Thursday
        0x07 => bcd(day),
        0x08 => bcd(month),
        0x09 => bcd((year % 100) as u32),
        0x32 => bcd((year / 100) as u32),
        0x0a => 0x26, // 32.768 kHz base, 1024 Hz rate, no update in progress
        0x0b => 0x02, // 24-hour mode, BCD, no interrupts
        0x0d => 0x80, // battery good: the time is valid
        _ => 0,
    }
}

impl PortDevice for Cmos {
    fn read(&mut self, offset: u16) -> u8 {
        if offset == 0 {
            return 0xff;
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        register(self.index, secs)
    }

    fn write(&mut self, offset: u16, value: u8) {
        if offset == 0 {
            self.index = value & 0x7f; // bit 7 is the NMI mask
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_hold_the_utc_date_in_bcd() {
        // 2026-12-03 17:51:09 UTC, a Thursday.
        let secs = 1_796_320_269;
        assert_eq!(register(0x09, secs), 0x26);
        assert_eq!(register(0x32, secs), 0x20);
        assert_eq!(register(0x08, secs), 0x12);
        assert_eq!(register(0x07, secs), 0x03);
        assert_eq!(register(0x04, secs), 0x17);
        assert_eq!(register(0x02, secs), 0x51);
        assert_eq!(register(0x00, secs), 0x09);
        assert_eq!(register(0x06, secs), 0x05);
    }
}
