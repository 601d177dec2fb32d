//! The gRPC face of the workmanager.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use virtufin_common::{ApiError, audit::Origin};
use virtufin_proto::workmanager::v1::{
    self as pb, code_source::Source, work_manager_server::WorkManager,
};

use crate::manager::{NewWorker, Record, Shared};

pub struct Service(pub Arc<Shared>);

fn source(cs: Option<pb::CodeSource>) -> (Vec<u8>, String, String) {
    match cs {
        Some(pb::CodeSource {
            source: Some(Source::Content(c)),
            sha256,
        }) => (c, String::new(), sha256),
        Some(pb::CodeSource {
            source: Some(Source::Url(u)),
            sha256,
        }) => (Vec::new(), u, sha256),
        Some(pb::CodeSource {
            source: None,
            sha256,
        }) => (Vec::new(), String::new(), sha256),
        None => (Vec::new(), String::new(), String::new()),
    }
}

fn info(r: Record) -> pb::WorkerInfo {
    let status = if r.status == "running" {
        pb::WorkerStatus::Running
    } else {
        pb::WorkerStatus::Stopped
    };
    pb::WorkerInfo {
        id: r.id,
        // The code itself is large: GetWorkerHistory returns it.
        code_source: None,
        mime_type: r.mime_type,
        language: r.language,
        topic: r.topic,
        group: r.group,
        created_at: r.created_at,
        status: status as i32,
        config: r.config.into_iter().collect(),
        tags: r.tags.into_iter().collect(),
        instances: if r.instances.is_empty() && status == pb::WorkerStatus::Running {
            vec![r.instance_id]
        } else {
            r.instances.into_iter().collect()
        },
    }
}

#[tonic::async_trait]
impl WorkManager for Service {
    async fn create_worker(
        &self,
        req: Request<pb::CreateWorkerRequest>,
    ) -> Result<Response<pb::CreateWorkerResponse>, Status> {
        let by = Origin::of(&req);
        let r = req.into_inner();
        let (content, url, sha) = source(r.code_source);
        let id = self
            .0
            .create(
                NewWorker {
                    content,
                    url,
                    sha256: sha,
                    mime_type: r.mime_type,
                    topic: r.topic,
                    group: r.group,
                    config: r.config,
                    tags: r.tags,
                },
                &by,
            )
            .await?;
        Ok(Response::new(pb::CreateWorkerResponse { id }))
    }

    async fn load_code(
        &self,
        req: Request<pb::LoadCodeRequest>,
    ) -> Result<Response<pb::LoadCodeResponse>, Status> {
        let by = Origin::of(&req);
        let r = req.into_inner();
        let (content, url, sha) = source(r.code_source);
        self.0.load_code(&r.id, &content, &url, &sha, &by).await?;
        Ok(Response::new(pb::LoadCodeResponse {}))
    }

    async fn start_worker(
        &self,
        req: Request<pb::StartWorkerRequest>,
    ) -> Result<Response<pb::StartWorkerResponse>, Status> {
        let by = Origin::of(&req);
        self.0.start(&req.into_inner().id, &by).await?;
        Ok(Response::new(pb::StartWorkerResponse {}))
    }

    async fn stop_worker(
        &self,
        req: Request<pb::StopWorkerRequest>,
    ) -> Result<Response<pb::StopWorkerResponse>, Status> {
        let by = Origin::of(&req);
        self.0.stop(&req.into_inner().id, &by).await?;
        Ok(Response::new(pb::StopWorkerResponse {}))
    }

    async fn delete_worker(
        &self,
        req: Request<pb::DeleteWorkerRequest>,
    ) -> Result<Response<pb::DeleteWorkerResponse>, Status> {
        let by = Origin::of(&req);
        self.0.delete(&req.into_inner().id, &by).await?;
        Ok(Response::new(pb::DeleteWorkerResponse {}))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let filters = req.into_inner().filters;
        let workers = self
            .0
            .list()
            .await?
            .into_iter()
            .filter(|r| filters.iter().all(|f| r.tags.get(&f.key) == Some(&f.value)))
            .map(info)
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn get_worker_history(
        &self,
        req: Request<pb::GetWorkerHistoryRequest>,
    ) -> Result<Response<pb::GetWorkerHistoryResponse>, Status> {
        let entries = self
            .0
            .history(&req.into_inner().id)
            .await?
            .into_iter()
            .map(|(created_at, code)| pb::HistoryEntry {
                code_source: Some(pb::CodeSource {
                    source: Some(Source::Content(code)),
                    sha256: String::new(),
                }),
                created_at,
            })
            .collect();
        Ok(Response::new(pb::GetWorkerHistoryResponse { entries }))
    }

    async fn recover_workers(
        &self,
        _req: Request<pb::RecoverWorkersRequest>,
    ) -> Result<Response<pb::RecoverWorkersResponse>, Status> {
        let n = self.0.recover().await?;
        Ok(Response::new(pb::RecoverWorkersResponse {
            recovered_count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn set_tag(
        &self,
        req: Request<pb::SetTagRequest>,
    ) -> Result<Response<pb::SetTagResponse>, Status> {
        let by = Origin::of(&req);
        let r = req.into_inner();
        self.0
            .set_tags(&r.id, [(r.key, r.value)].into_iter().collect(), &by)
            .await?;
        Ok(Response::new(pb::SetTagResponse {}))
    }

    async fn get_tag(
        &self,
        req: Request<pb::GetTagRequest>,
    ) -> Result<Response<pb::GetTagResponse>, Status> {
        let r = req.into_inner();
        let rec = self.0.record(&r.id).await?;
        match rec.tags.get(&r.key) {
            Some(v) => Ok(Response::new(pb::GetTagResponse { value: v.clone() })),
            None => {
                Err(ApiError::not_found(format!("worker {} has no tag '{}'", r.id, r.key)).into())
            }
        }
    }

    async fn set_tags(
        &self,
        req: Request<pb::SetTagsRequest>,
    ) -> Result<Response<pb::SetTagsResponse>, Status> {
        let by = Origin::of(&req);
        let r = req.into_inner();
        self.0.set_tags(&r.id, r.tags, &by).await?;
        Ok(Response::new(pb::SetTagsResponse {}))
    }

    async fn get_tags(
        &self,
        req: Request<pb::GetTagsRequest>,
    ) -> Result<Response<pb::GetTagsResponse>, Status> {
        let rec = self.0.record(&req.into_inner().id).await?;
        Ok(Response::new(pb::GetTagsResponse {
            tags: rec.tags.into_iter().collect(),
        }))
    }
}
