//! `ferry exec -i/-t`: an interactive exec over control's exec WebSocket
//! (protocol: [`ferry_api::exec`]). With `-t` the remote command gets a terminal; when the
//! local stdin is one too it goes raw for the session (restored on the way out) and window
//! size changes follow.

use anyhow::{Context, bail};
use ferry_api::exec::{self, ExecParams, ExecStatus, WinSize};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Puts the terminal on stdin in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw)
            .context("setting the terminal raw")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

/// The size of the terminal on stdout (or stdin), if either is one.
fn local_size() -> Option<WinSize> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize into a local.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some(WinSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// Runs the session; returns the remote command's exit code for `ferry` to exit with (a
/// signal becomes 128 + its number, as shells do).
pub async fn interactive(
    api_base: &str,
    service: &str,
    instance: Option<String>,
    argv: Vec<String>,
    stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let params = ExecParams {
        command: argv,
        tty,
        stdin,
        size: if tty { local_size() } else { None },
        instance,
    };
    let q = serde_urlencoded::to_string(params.to_pairs())?;
    let base = api_base.trim_end_matches('/');
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        bail!("FERRY_API {base:?}: expected an http:// or https:// address");
    };
    let url = format!("{ws_base}/v1/services/{service}/exec?{q}");
    let (ws, _) = match tokio_tungstenite::connect_async(&url).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            // The API's error body, printed as the other verbs print it.
            if let Ok(e) = serde_json::from_slice::<ferry_api::service::ApiError>(&body) {
                bail!("{} ({}, request {})", e.message, e.code, e.request_id);
            }
            bail!(
                "{url}: {}: {}",
                resp.status(),
                String::from_utf8_lossy(&body)
            );
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot reach the Ferry API at {base} (is `ferry server` running? set FERRY_API)")
            });
        }
    };
    let (mut tx, mut rx) = ws.split();
    let _raw = if tty && stdin && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    // Stdin is read on a thread of its own (a blocking read cannot be cancelled); it ends
    // with the process.
    let (in_tx, mut in_rx) = mpsc::channel::<Option<Vec<u8>>>(8);
    if stdin {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            let mut input = std::io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = in_tx.blocking_send(None);
                        return;
                    }
                    Ok(n) => {
                        if in_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        drop(in_tx);
    }
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin_open = stdin;
    let mut status: Option<ExecStatus> = None;
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => match b.first().copied() {
                    Some(exec::STDOUT) => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&b[1..])?;
                        out.flush()?;
                    }
                    Some(exec::STDERR) => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&b[1..])?;
                        err.flush()?;
                    }
                    Some(exec::STATUS) => {
                        status = Some(serde_json::from_slice(&b[1..]).context("exec status")?);
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("exec stream: {e}"),
            },
            chunk = in_rx.recv(), if stdin_open => {
                let frame = match chunk {
                    Some(Some(data)) => exec::frame(exec::STDIN, &data),
                    Some(None) | None => {
                        stdin_open = false;
                        exec::frame(exec::CLOSE, &[0])
                    }
                };
                if tx.send(Message::Binary(frame.into())).await.is_err() {
                    break;
                }
            }
            _ = winch.recv(), if tty => {
                if let Some(size) = local_size() {
                    let body = serde_json::to_vec(&size)?;
                    let _ = tx.send(Message::Binary(exec::frame(exec::RESIZE, &body).into())).await;
                }
            }
        }
    }
    // Answer the server's Close so neither side closes with unread data.
    let _ = tx.close().await;
    drop(_raw);
    match status {
        Some(ExecStatus { error: Some(e), .. }) => bail!("exec: {e}"),
        Some(ExecStatus { code: Some(c), .. }) => Ok(c),
        Some(ExecStatus {
            signal: Some(s), ..
        }) => Ok(128 + s),
        _ => bail!("exec: the connection closed before the command's exit status arrived"),
    }
}
