//! `GET /v1/services/{name}/exec`: an interactive exec. Control picks the instance, opens the
//! node agent's exec WebSocket with the same query, and only then accepts the client's
//! upgrade, so every error before the command runs is an HTTP status with the usual JSON
//! body. After that it relays frames both ways untouched (the protocol is
//! [`ferry_api::exec`]).

use super::{Result, check_name, err, not_found, pick_instance};
use crate::Control;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_api::exec::ExecParams;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::{self, Message as NodeMessage};

pub(crate) async fn exec_stream(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    check_name(&name)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("exec query: {e}"),
        )
    })?;
    let mut params = ExecParams::from_pairs(pairs)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "invalid_command", e.to_string()))?;
    let ws = ws.map_err(|e| {
        err(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("an interactive exec is a WebSocket ({e}); POST runs a buffered one"),
        )
    })?;
    c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let (id, addr) = pick_instance(&c, &name, params.instance.take().as_deref(), true)?;
    let q = serde_urlencoded::to_string(params.to_pairs()).map_err(|e| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("exec query: {e}"),
        )
    })?;
    let url = format!("ws://{addr}/v1/instances/{id}/exec?{q}");
    let node = match tokio_tungstenite::connect_async(url).await {
        Ok((node, _)) => node,
        Err(tungstenite::Error::Http(resp)) => {
            // The agent's own error (unknown instance, a command that cannot start) as is.
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = resp.into_body().unwrap_or_default();
            return Ok((status, [("content-type", "application/json")], body).into_response());
        }
        Err(e) => {
            return Err(err(
                StatusCode::BAD_GATEWAY,
                "node_unreachable",
                format!("node API: {e}"),
            ));
        }
    };
    Ok(ws.on_upgrade(move |client| relay(client, node)))
}

/// Frames go both ways until either side closes; then the other is closed too.
async fn relay(
    client: WebSocket,
    node: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut n_tx, mut n_rx) = node.split();
    let up = async {
        let mut node_open = true;
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                Message::Binary(b) => NodeMessage::Binary(b),
                Message::Text(t) => NodeMessage::text(t.as_str()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            // Once the node is gone the client's frames are still read (and dropped) until
            // its Close, so this socket never closes with unread data (a reset would lose the
            // status frame the client has not read yet).
            if node_open && n_tx.send(m).await.is_err() {
                node_open = false;
            }
        }
        let _ = n_tx.send(NodeMessage::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(m)) = n_rx.next().await {
            let m = match m {
                NodeMessage::Binary(b) => Message::Binary(b),
                NodeMessage::Text(t) => Message::text(t.as_str()),
                NodeMessage::Close(_) => break,
                _ => continue,
            };
            if c_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = c_tx.send(Message::Close(None)).await;
    };
    // The client ending ends the session. The node ending (after its status frame) closes
    // the client's side, whose Close answer then ends `up`, within a bound.
    tokio::pin!(up);
    tokio::select! {
        () = &mut up => {}
        () = down => {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut up).await;
        }
    }
}
