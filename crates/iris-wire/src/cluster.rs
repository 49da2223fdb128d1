//! What a worker and its controller agree on beyond the messages themselves: attribute names a
//! worker reports and a controller's scheduler reads, and the margin a controller adds to a
//! worker's lease before it runs that worker's tasks elsewhere.

use std::time::Duration;

use crate::proto::{AttributeValue, attribute_value};

/// The worker attribute that says a filesystem is below the hard disk threshold (its value
/// is why): the controller places no task on such a worker, and with Iris's controller a job
/// can ask for `!disk_pressure`. Sent while the pressure lasts, gone when space returns.
pub const DISK_PRESSURE_ATTRIBUTE: &str = "disk_pressure";

/// A string attribute value.
pub fn attribute_text(v: &str) -> AttributeValue {
    AttributeValue { value: Some(attribute_value::Value::StringValue(v.to_string())) }
}

/// What a controller adds to a worker's fence before it runs the worker's tasks elsewhere: for
/// two hosts' clocks running at slightly different rates, and the time between the worker's
/// send and the controller's reading of a heartbeat.
pub const CONTROLLER_MARGIN: Duration = Duration::from_millis(500);
