// Streams one generation from a genserve server: node client.js HOST:PORT "prompt" [max_new_tokens]
// Prints each text delta as it arrives, then one JSON line with the summary.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "genserve", "v1", "generate.proto");
const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true });
const genserve = grpc.loadPackageDefinition(definition).genserve.v1;

const [target = "localhost:50051", prompt = "Hello", maxNewTokens = "32"] = process.argv.slice(2);
const client = new genserve.TextGeneration(target, grpc.credentials.createInsecure());

const request = {
  messages: { messages: [{ role: "user", content: prompt }] },
  parameters: { max_new_tokens: Number(maxNewTokens) },
  return_token_ids: true,
};
let text = "";
let tokens = 0;
let finishReason = null;
const call = client.GenerateStream(request);
call.on("data", (message) => {
  process.stdout.write(message.text);
  text += message.text;
  tokens += message.token_ids.length;
  if (message.finish_reason !== "FINISH_REASON_UNSPECIFIED") finishReason = message.finish_reason;
});
call.on("error", (error) => {
  console.error(`\nerror: ${error.code} ${error.details}`);
  process.exit(1);
});
call.on("end", () => {
  process.stdout.write("\n" + JSON.stringify({ text, tokens, finish_reason: finishReason }) + "\n");
});
