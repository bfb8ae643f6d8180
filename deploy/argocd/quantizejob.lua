-- Argo CD health check for kubeforge.io/QuantizeJob
-- (argocd-cm: resource.customizations.health.kubeforge.io_QuantizeJob).
-- Written for Argo CD's Lua 5.1 (gopher-lua). Healthy once Succeeded (the quality gate
-- passed), Degraded when it Failed (including a missed gate) or its spec was refused,
-- Progressing while it waits for its input model or runs.
local hs = { status = "Progressing", message = "Waiting for the KubeForge operator" }

local function condition(st, t)
  if st.conditions == nil then return nil end
  for _, c in ipairs(st.conditions) do
    if c.type == t then return c end
  end
  return nil
end

local st = obj.status
if st == nil then return hs end
local generation = obj.metadata.generation
if st.observedGeneration == nil or (generation ~= nil and st.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local accepted = condition(st, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = "Spec rejected: " .. (accepted.message or accepted.reason or "")
  return hs
end

local phase = st.phase or "Pending"
local r = st.result
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if r ~= nil and r.compressionRatio ~= nil then
    hs.message = hs.message .. string.format(": %.2fx smaller", r.compressionRatio)
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed"
  if r ~= nil and r.gatePassed == false then
    hs.message = "Failed: quality gate missed"
    if r.perplexityIncreasePercent ~= nil then
      hs.message = hs.message .. string.format(" (perplexity +%.2f%%)", r.perplexityIncreasePercent)
    end
  else
    local failed = condition(st, "Failed")
    if failed ~= nil and failed.message ~= nil and failed.message ~= "" then hs.message = "Failed: " .. failed.message end
  end
elseif phase == "WaitingForInput" then
  local input = condition(st, "InputReady")
  hs.message = "Waiting for its input model"
  if input ~= nil and input.message ~= nil and input.message ~= "" then hs.message = hs.message .. ": " .. input.message end
else
  hs.message = phase
end
return hs
