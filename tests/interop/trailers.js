// One unary Generate; prints the call's trailing metadata as JSON, binary values base64-encoded.
// grpc-js hands every trailer to the application, the standard ORCA one included.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "genserve", "v1", "generate.proto");
const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true });
const genserve = grpc.loadPackageDefinition(definition).genserve.v1;
const client = new genserve.TextGeneration(process.argv[2], grpc.credentials.createInsecure());

const call = client.Generate(
  { input_ids: { ids: [5, 6, 7] }, parameters: { max_new_tokens: 3 } },
  (error) => {
    if (error) {
      console.error(`error: ${error.code} ${error.details}`);
      process.exit(1);
    }
  },
);
call.on("status", (status) => {
  const trailers = {};
  for (const [key, values] of Object.entries(status.metadata.getMap())) {
    trailers[key] = Buffer.isBuffer(values) ? values.toString("base64") : values;
  }
  console.log(JSON.stringify(trailers));
});
