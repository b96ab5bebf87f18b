"""Federation: the wire protocol, the MQTT layer (the only paho importer), aggregation and
update validation, and the device client."""
