//! Publishing to Kafka: message schemas and the outbox publisher.

pub mod kafka;
pub mod messages;
