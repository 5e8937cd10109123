// Publish text events to embedstream with kafkajs, each envelope validated first against the
// wire format's JSON Schema (services/embedstream/data/envelope.schema.json, the same file the
// worker reads its rules from).
//
//   node produce.mjs <bootstrap> <topic> <id>=<text> [<id>=<text> ...]
//
// Prints the ids it published; exits 1 (publishing nothing) when an envelope is invalid.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import Ajv2020 from "ajv/dist/2020.js";
import { Kafka, logLevel } from "kafkajs";

const schemaPath = fileURLToPath(
  new URL("../../services/embedstream/data/envelope.schema.json", import.meta.url));
const ajv = new Ajv2020({ strict: false, allErrors: true });
const validateText = ajv.compile(JSON.parse(readFileSync(schemaPath, "utf8")));

export function envelope(id, text, metadata) {
  const body = { id, text, ...(metadata ? { metadata } : {}) };
  if (!validateText(body)) {
    throw new Error(`invalid envelope ${JSON.stringify(body)}: ${ajv.errorsText(validateText.errors)}`);
  }
  return body;
}

async function main([bootstrap, topic, ...pairs]) {
  const messages = pairs.map((pair) => {
    const cut = pair.indexOf("=");
    const body = envelope(pair.slice(0, cut), pair.slice(cut + 1), { lang: "en", via: "kafkajs" });
    // The key is the id: a document's updates stay in one partition, in order.
    return { key: body.id, value: JSON.stringify(body) };
  });
  const kafka = new Kafka({ clientId: "embedstream-node", brokers: [bootstrap], logLevel: logLevel.ERROR });
  const producer = kafka.producer();
  await producer.connect();
  try {
    await producer.send({ topic, messages });
  } finally {
    await producer.disconnect();
  }
  console.log(messages.map((m) => m.key).join("\n"));
}

main(process.argv.slice(2)).catch((err) => {
  console.error(err.message);
  process.exit(1);
});
