// Verifies requests Spiegel signed the Standard Webhooks way, with the
// spec's reference library. Reads {"secret": "whsec_...", "requests":
// [{"headers": {...}, "body": "..."}]} on stdin; prints one line per request
// ("ok" or the library's error) and exits 1 if any failed.
"use strict";
const { Webhook } = require("standardwebhooks");

let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const { secret, requests } = JSON.parse(input);
  const webhook = new Webhook(secret);
  let failed = 0;
  for (const { headers, body } of requests) {
    try {
      webhook.verify(body, headers);
      console.log("ok");
    } catch (e) {
      failed += 1;
      console.log(`failed: ${e.message}`);
    }
  }
  process.exit(failed ? 1 : 0);
});
