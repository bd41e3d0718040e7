//! A child's start-up breakdown, read from its `vmm.log`: the line
//! `forkd-vmm[ID]: startup µs: exec=812 vm=3288 ... total=7000` that
//! `forkd-vmm` writes when its guest is ready (see `server/vmm/src/startup.rs`).

use std::path::Path;

/// The tag before the figures.
const TAG: &str = "startup µs:";

/// The phases of one line, in order, each in µs.
pub type Phases = Vec<(String, u64)>;

/// Parses the first start-up line of a log.
pub fn parse(log: &str) -> Option<Phases> {
    let line = log.lines().find(|l| l.contains(TAG))?;
    let figures = line.split_once(TAG)?.1;
    figures
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The start-up line of sandbox `id` under the daemon's `data_dir`.
pub fn read(data_dir: &Path, id: &str) -> Option<Phases> {
    let log = std::fs::read_to_string(data_dir.join("sandboxes").join(id).join("vmm.log")).ok()?;
    parse(&log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_line_among_others() {
        let log =
            "forkd-vmm: something\nforkd-vmm[sb-1]: startup µs: exec=812 vm=3288 total=4100\n";
        assert_eq!(
            parse(log).unwrap(),
            vec![
                ("exec".to_string(), 812),
                ("vm".to_string(), 3288),
                ("total".to_string(), 4100)
            ]
        );
    }

    #[test]
    fn no_line_or_a_bad_figure_is_none() {
        assert_eq!(parse("forkd-vmm: nothing\n"), None);
        assert_eq!(parse("x startup µs: vm=abc\n"), None);
    }
}
