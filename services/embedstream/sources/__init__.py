"""Sources: where events come from (Kafka), and the dead-letter topic."""
