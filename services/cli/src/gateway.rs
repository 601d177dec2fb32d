//! `virtufin gateway`: calls configured backends through the api's Gateway.

use std::process::ExitCode;

use clap::Subcommand;
use virtufin_api_client::{ClientError, pb};

#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Lists the configured backend services (and their circuits).
    Services,
    /// Lists a service's methods, learnt by reflection.
    Methods { service: String },
    /// Prints the JSON description of a method's input and output.
    Schema { service: String, method: String },
    /// Calls a method with a protobuf-JSON request; prints the answer (a
    /// server-streaming method prints one JSON line per message).
    Invoke {
        service: String,
        /// "Method", "Service/Method" or "package.Service/Method".
        method: String,
        /// The request as protobuf JSON.
        #[arg(default_value = "{}")]
        request: String,
        /// Deadline in milliseconds (0 = the backend's).
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
        /// Stream the answers of a server-streaming method as they come.
        #[arg(long)]
        stream: bool,
    },
}

pub async fn run(addr: &str, cmd: GatewayCmd) -> anyhow::Result<ExitCode> {
    let api = crate::api_client(addr)?;
    let mut gw = api.gateway();
    match cmd {
        GatewayCmd::Services => {
            let r = gw
                .list_services(pb::ListServicesRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            for d in r.details {
                println!(
                    "{}",
                    serde_json::json!({"name": d.name, "host": d.host, "port": d.port,
                        "reflection_enabled": d.reflection_enabled, "circuit": d.circuit,
                        "grpc_services": d.grpc_services})
                );
            }
        }
        GatewayCmd::Methods { service } => {
            let r = gw
                .list_methods(pb::ListMethodsRequest { service })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            for m in r.methods {
                let kind = if m.is_server_streaming {
                    " (server-streaming)"
                } else if m.is_client_streaming {
                    " (client-streaming: not callable)"
                } else {
                    ""
                };
                println!(
                    "{}({}) -> {}{kind}",
                    m.full_name, m.input_type, m.output_type
                );
            }
        }
        GatewayCmd::Schema { service, method } => {
            let r = gw
                .get_method_schema(pb::GetMethodSchemaRequest {
                    service,
                    method,
                    r#type: String::new(),
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({"input": parse(&r.input_schema), "output": parse(&r.output_schema)})
            );
        }
        GatewayCmd::Invoke {
            service,
            method,
            request,
            timeout_ms,
            stream,
        } => {
            let req = pb::InvokeRequest {
                service,
                method,
                request_data: request,
                timeout_ms,
            };
            if stream {
                let mut s = gw
                    .invoke_stream(req)
                    .await
                    .map_err(ClientError::from)?
                    .into_inner();
                loop {
                    let next = tokio::select! {
                        m = s.message() => m.map_err(ClientError::from)?,
                        _ = tokio::signal::ctrl_c() => None,
                    };
                    let Some(m) = next else { break };
                    println!("{}", m.response_data);
                }
            } else {
                let r = gw
                    .invoke(req)
                    .await
                    .map_err(ClientError::from)?
                    .into_inner();
                if !r.success {
                    eprintln!("{}: {}", r.status, r.message);
                    return Ok(ExitCode::from(2));
                }
                println!("{}", r.response_data);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
