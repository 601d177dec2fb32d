//! The websocketmanager's metrics beyond every service's (see
//! `virtufin_common::metrics`): connections by state, frames in and out,
//! reconnect attempts. No label names a connection (ids are unbounded);
//! the per-connection view is `GET /v1/connections`.

use std::sync::{Arc, Weak};

use virtufin_common::metrics::{Counters, Gauges, Metrics};

use crate::{conn::Status, manager::Shared};

/// The websocketmanager's metric families.
#[derive(Debug)]
pub struct WsMetrics {
    pub base: Arc<Metrics>,
    frames: Counters,
    reconnects: Counters,
    connections: Gauges,
}

/// A frame's direction.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    In,
    Out,
}

impl WsMetrics {
    pub fn new() -> Self {
        let base = Metrics::new("virtufin-websocketmanager", env!("CARGO_PKG_VERSION"));
        let frames = Counters::default();
        base.register(
            "websocket_frames",
            "WebSocket data frames received from peers (in) and written to them (out), by kind (text, binary)",
            frames.clone(),
        );
        let reconnects = Counters::default();
        base.register(
            "websocket_reconnect_attempts",
            "Reconnect attempts after a connection was lost or could not be opened",
            reconnects.clone(),
        );
        let connections = Gauges::default();
        base.register(
            "websocket_connections",
            "Connections owned by this instance, by state (connecting, connected, reconnecting, disconnected)",
            connections.clone(),
        );
        Self {
            base,
            frames,
            reconnects,
            connections,
        }
    }

    pub fn frame(&self, direction: Direction, text: bool) {
        let d = match direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let kind = if text { "text" } else { "binary" };
        self.frames
            .get_or_create(&vec![
                ("direction", d.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    pub fn reconnect_attempt(&self) {
        self.reconnects.get_or_create(&Vec::new()).inc();
    }

    /// Counts the connections by state at each scrape (every state is
    /// exported, 0 included, so a query never finds a series missing).
    pub fn follow(&self, shared: Weak<Shared>) {
        let gauges = self.connections.clone();
        self.base.on_scrape(move || {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut counts = [0i64; 4];
            for s in shared.statuses() {
                counts[s as usize] += 1;
            }
            for s in [
                Status::Connecting,
                Status::Connected,
                Status::Reconnecting,
                Status::Disconnected,
            ] {
                gauges
                    .get_or_create(&vec![("state", s.as_str().to_owned())])
                    .set(counts[s as usize]);
            }
        });
    }
}

impl Default for WsMetrics {
    fn default() -> Self {
        Self::new()
    }
}
