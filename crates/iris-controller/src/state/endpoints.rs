//! Endpoints a job's tasks register, removed when the job ends.

use super::{State, invalid};
use crate::ControllerError;
use crate::model::{EndpointRec, job_terminal};
use iris_wire::proto::controller::{self as pc};

impl State {
    pub fn register_endpoint(&mut self, r: pc::RegisterEndpointRequest) -> Result<String, ControllerError> {
        if r.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if r.address.is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        let Some(job) = self.jobs.get(&r.job_id) else {
            return Err(ControllerError::NotFound { what: "job_id", id: r.job_id });
        };
        if job_terminal(job.rec.state) {
            return Err(ControllerError::FailedPrecondition(format!("job {} has ended", r.job_id)));
        }
        self.next_id += 1;
        let endpoint_id = format!("ep-{}", self.next_id);
        let rec = EndpointRec {
            endpoint_id: endpoint_id.clone(),
            name: r.name,
            address: r.address,
            job_id: r.job_id,
            metadata: r.metadata.into_iter().collect(),
        };
        self.endpoints.insert(endpoint_id.clone(), rec);
        self.dirty.endpoints.insert(endpoint_id.clone());
        Ok(endpoint_id)
    }

    pub fn unregister_endpoint(&mut self, id: &str) -> Result<(), ControllerError> {
        if self.endpoints.remove(id).is_none() {
            return Err(ControllerError::NotFound { what: "endpoint_id", id: id.to_string() });
        }
        self.dirty.endpoints.remove(id);
        self.dirty.deleted_endpoints.insert(id.to_string());
        Ok(())
    }
}
