//! The interactive exec stream: a WebSocket between the CLI and control, relayed as is to the
//! node agent (`GET /v1/services/{name}/exec` → `GET /v1/instances/{id}/exec`).
//!
//! The command and its options travel in the query of the upgrade request
//! ([`ExecParams`]), so a bad command or an unknown service is an HTTP error before any
//! upgrade. After the upgrade every frame is binary, its first byte a channel, as in
//! Kubernetes' `v5.channel.k8s.io`:
//!
//! | channel | direction | payload |
//! | --- | --- | --- |
//! | 0 [`STDIN`] | client → server | bytes for the command's stdin (or the terminal) |
//! | 1 [`STDOUT`] | server → client | bytes the command wrote (with a TTY: everything) |
//! | 2 [`STDERR`] | server → client | bytes the command wrote to stderr (none with a TTY) |
//! | 3 [`STATUS`] | server → client | [`ExecStatus`] JSON, the last frame before the close |
//! | 4 [`RESIZE`] | client → server | [`WinSize`] JSON, applied to the terminal |
//! | 255 [`CLOSE`] | client → server | `[255, 0]`: stdin is at EOF |

use serde::{Deserialize, Serialize};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a command ended, or why it could not start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The query of an exec upgrade: `command` repeated once per argument, then the options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecParams {
    pub command: Vec<String>,
    /// Allocate a pseudo-terminal (stdout and stderr merge into it).
    pub tty: bool,
    /// Connect the client's stdin; without it the command reads /dev/null.
    pub stdin: bool,
    /// The terminal's size at start (with `tty`); 24×80 when absent.
    pub size: Option<WinSize>,
    /// Control only: which instance of the service.
    pub instance: Option<String>,
}

/// A query that does not make an [`ExecParams`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exec query: {0}")]
pub struct ExecParamsError(pub String);

impl ExecParams {
    /// Parses pairs already URL-decoded (as a form decoder yields them).
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<ExecParams, ExecParamsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut p = ExecParams::default();
        let (mut rows, mut cols) = (None, None);
        let flag = |k: &str, v: String| match v.as_str() {
            "" | "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            _ => Err(ExecParamsError(format!(
                "{k}={v:?}: expected true or false"
            ))),
        };
        let dim = |k: &str, v: String| match v.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ExecParamsError(format!("{k}={v:?}: expected 1..65535"))),
        };
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.into());
            match k {
                "command" => p.command.push(v),
                "tty" => p.tty = flag(k, v)?,
                "stdin" => p.stdin = flag(k, v)?,
                "rows" => rows = Some(dim(k, v)?),
                "cols" => cols = Some(dim(k, v)?),
                "instance" => p.instance = Some(v),
                other => return Err(ExecParamsError(format!("unknown parameter {other:?}"))),
            }
        }
        if p.command.is_empty() {
            return Err(ExecParamsError(
                "no command: give it as command=ARG, once per argument".into(),
            ));
        }
        if p.command.iter().any(|a| a.contains('\0')) {
            return Err(ExecParamsError("a command argument contains NUL".into()));
        }
        p.size = match (rows, cols) {
            (None, None) => None,
            (Some(rows), Some(cols)) => Some(WinSize { rows, cols }),
            _ => {
                return Err(ExecParamsError("rows and cols go together".into()));
            }
        };
        Ok(p)
    }

    /// The pairs of the query, in the order [`ExecParams::from_pairs`] reads them.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = self
            .command
            .iter()
            .map(|a| ("command", a.clone()))
            .collect();
        v.push(("tty", self.tty.to_string()));
        v.push(("stdin", self.stdin.to_string()));
        if let Some(s) = self.size {
            v.push(("rows", s.rows.to_string()));
            v.push(("cols", s.cols.to_string()));
        }
        if let Some(i) = &self.instance {
            v.push(("instance", i.clone()));
        }
        v
    }
}

/// A frame on `channel` carrying `payload`.
pub fn frame(channel: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(channel);
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip() {
        let p = ExecParams {
            command: vec!["sh".into(), "-c".into(), "echo a&b=c".into()],
            tty: true,
            stdin: true,
            size: Some(WinSize {
                rows: 40,
                cols: 100,
            }),
            instance: Some("i-1".into()),
        };
        assert_eq!(ExecParams::from_pairs(p.to_pairs()).unwrap(), p);
    }

    #[test]
    fn params_errors_name_what_is_wrong() {
        let e = |pairs: &[(&str, &str)]| {
            ExecParams::from_pairs(pairs.iter().map(|(k, v)| (*k, v.to_string())))
                .unwrap_err()
                .to_string()
        };
        assert!(e(&[("tty", "true")]).contains("no command"));
        assert!(e(&[("command", "ls"), ("tty", "maybe")]).contains("tty"));
        assert!(e(&[("command", "ls"), ("rows", "0"), ("cols", "3")]).contains("rows"));
        assert!(e(&[("command", "ls"), ("rows", "10")]).contains("together"));
        assert!(e(&[("command", "ls"), ("colour", "1")]).contains("colour"));
        assert!(e(&[("command", "a\0b")]).contains("NUL"));
    }
}
