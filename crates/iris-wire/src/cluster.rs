//! What a worker and its controller agree on beyond the messages themselves: attribute names a
//! worker reports and a controller's scheduler reads, and the margin a controller adds to a
//! worker's lease before it runs that worker's tasks elsewhere.

use std::time::Duration;

use crate::proto::newest::iris::job;
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

/// A worker attribute's value as an operator writes it (`--attribute key=value`): whole numbers
/// are ints, other numbers floats, the rest strings, so a controller's ordering constraints
/// compare numbers. Read once here; each wire generation has its own message for it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeText {
    /// A whole number.
    Int(i64),
    /// Another number.
    Float(f64),
    /// Anything else.
    Text(String),
}

impl AttributeText {
    /// Reads an attribute's text.
    pub fn parse(v: &str) -> AttributeText {
        if let Ok(i) = v.parse::<i64>() {
            AttributeText::Int(i)
        } else if let Ok(f) = v.parse::<f64>() {
            AttributeText::Float(f)
        } else {
            AttributeText::Text(v.to_string())
        }
    }
}

impl From<AttributeText> for AttributeValue {
    fn from(a: AttributeText) -> AttributeValue {
        use attribute_value::Value;
        let value = match a {
            AttributeText::Int(i) => Value::IntValue(i),
            AttributeText::Float(f) => Value::FloatValue(f),
            AttributeText::Text(s) => Value::StringValue(s),
        };
        AttributeValue { value: Some(value) }
    }
}

impl From<AttributeText> for job::AttributeValue {
    fn from(a: AttributeText) -> job::AttributeValue {
        use job::attribute_value::Value;
        let value = match a {
            AttributeText::Int(i) => Value::IntValue(i),
            AttributeText::Float(f) => Value::FloatValue(f),
            AttributeText::Text(s) => Value::StringValue(s),
        };
        job::AttributeValue { value: Some(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::AttributeText;

    #[test]
    fn attribute_text_reads_numbers_as_numbers() {
        assert_eq!(AttributeText::parse("8"), AttributeText::Int(8));
        assert_eq!(AttributeText::parse("-3"), AttributeText::Int(-3));
        assert_eq!(AttributeText::parse("2.5"), AttributeText::Float(2.5));
        assert_eq!(AttributeText::parse("v5e-8"), AttributeText::Text("v5e-8".into()));
    }
}
